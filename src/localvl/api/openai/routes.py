"""OpenAI's Chat Completions route (``/v1/models`` is shared: api/models.py)."""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from localvl.api.auth import require_api_key
from localvl.api.deadline import DeadlineStream
from localvl.api.disconnect import until_disconnect
from localvl.api.limits import rate_limited
from localvl.api.middleware import new_id
from localvl.api.openai import convert
from localvl.api.openai.schemas import ChatCompletionRequest
from localvl.api.openai.stream import collect_completion, completion_chunks
from localvl.api.validation import parse_body
from localvl.engine.protocol import Engine, GenerationStream
from localvl.media.fetch import fetch_all


router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions", dependencies=[Depends(rate_limited)])
async def chat_completions(request: Request) -> Any:
    state = request.app.state
    engine: Engine = state.engine
    body = parse_body(ChatCompletionRequest, await request.body())
    state.model_names.require(body.model)
    completion_id = new_id("chatcmpl-")
    settings = state.settings
    fetched = await fetch_all(convert.image_urls(body), settings.url_policy(), settings.max_image_bytes)
    generations = await anyio.to_thread.run_sync(convert.generation_requests, completion_id, body, settings.media(fetched))
    streams: list[GenerationStream] = []
    try:
        for generation in generations:
            streams.append(DeadlineStream(await engine.submit(generation), settings.request_timeout))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    created = int(time.time())
    request.state.model = state.model_names.require(body.model).name

    def done(usage: dict[str, int]) -> None:
        request.state.usage = usage  # for the access log and the rate limits: counts only

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            completion_chunks(
                streams, completion_id, body.model, created, include_usage, state.settings.ping_interval,
                logprobs=bool(body.logprobs), on_done=done,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completion = await until_disconnect(
        request, collect_completion(streams, completion_id, body.model, created, logprobs=bool(body.logprobs), on_done=done)
    )
    return JSONResponse(completion)
