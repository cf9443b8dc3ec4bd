"""OpenAI's Chat Completions route (``/v1/models`` is shared: api/models.py)."""

from __future__ import annotations

import functools
import time
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from localvl.api.auth import require_api_key
from localvl.api.deadline import Deadline
from localvl.api.disconnect import until_disconnect
from localvl.api.limits import charge_unfinished, openai_rate_limited
from localvl.api.middleware import new_id
from localvl.prompt.outputs import tool_call_id
from localvl.api.openai import convert
from localvl.api.openai.schemas import ChatCompletionRequest
from localvl.api.openai.stream import collect_completion, completion_chunks, replayed_chunks
from localvl.api.response_cache import request_key
from localvl.api.validation import load_json_object, parse_body
from localvl.engine.protocol import Engine, GenerationStream
from localvl.media.fetch import fetch_all


router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions", dependencies=[Depends(openai_rate_limited)])
async def chat_completions(request: Request) -> Any:
    state = request.app.state
    deadline = Deadline(state.settings.request_timeout)
    engine: Engine = state.engine
    raw = await deadline.read(request.body())
    body = parse_body(ChatCompletionRequest, raw)
    served = state.model_names.require(body.model).name
    completion_id = new_id("chatcmpl-")
    settings = state.settings
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    cache = state.response_cache
    key = None if cache is None else request_key(state, request.state.owner, load_json_object(raw), served, "openai")
    if key is not None:
        hit = await cache.get(key)
        request.scope["state"].setdefault("response_headers", {})["x-localvl-cache"] = "hit" if hit else "miss"
        if hit is not None:
            request.state.model, request.state.cache_hit, request.state.usage = served, True, hit["localvl_usage"]
            completion = {k: v for k, v in hit.items() if k != "localvl_usage"}
            completion.update(id=completion_id, created=int(time.time()), model=body.model, choices=[
                _fresh_call_ids(choice) for choice in completion.get("choices", [])
            ])
            if isinstance(completion.get("usage"), dict):  # nothing computed this time: the whole prompt reads as cached
                usage = completion["usage"] = dict(completion["usage"])
                usage["prompt_tokens_details"] = {**(usage.get("prompt_tokens_details") or {}), "cached_tokens": usage.get("prompt_tokens", 0)}
            if body.stream:
                return StreamingResponse(replayed_chunks(completion, include_usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return JSONResponse(completion)
    fetched = await deadline.within(fetch_all(convert.image_urls(body), settings.url_policy(), settings.max_image_bytes))
    generations = await anyio.to_thread.run_sync(convert.generation_requests, completion_id, body, settings.media(fetched))
    streams: list[GenerationStream] = []
    try:
        for generation in generations:
            # The queue limit admits the request, all its choices or none: once its first choice
            # is in, the others skip the check (else n past --max-queue could never run), and a
            # failure of any choice closes those already in.
            generation.queue_checked = bool(streams)
            streams.append(await deadline.submit(engine, generation))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    charge_unfinished(request, streams)
    created = int(time.time())
    request.state.model = served

    def done(usage: dict[str, int], completion: dict[str, Any]) -> None:
        request.state.usage = usage  # for the access log and the rate limits: counts only
        if key is not None:
            stored = {**completion, "localvl_usage": usage}
            request.scope["state"].setdefault("finishers", []).append(functools.partial(cache.put, key, stored))

    if body.stream:
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


def _fresh_call_ids(choice: dict[str, Any]) -> dict[str, Any]:
    """A cached choice with new tool call ids: a client repeating a conversation's start gets calls of its own."""
    message = choice.get("message") or {}
    if not message.get("tool_calls"):
        return choice
    calls = [dict(call, id="call_" + tool_call_id().removeprefix("toolu_")) for call in message["tool_calls"]]
    return dict(choice, message=dict(message, tool_calls=calls))
