"""Anthropic's Messages API routes: messages, count_tokens, models."""

from __future__ import annotations

import asyncio
import base64
from datetime import timezone
from typing import Any, Awaitable, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from localvl.api.anthropic import convert
from localvl.api.anthropic.schemas import CountTokensRequest, MessagesRequest, parse_body
from localvl.api.anthropic.stream import collect_message, message_events
from localvl.api.auth import check_api_key
from localvl.api.middleware import new_id
from localvl.api.model_names import ModelNames, ServedModel
from localvl.engine.protocol import Engine
from localvl.errors import InvalidRequestError, NotFoundError
from localvl.media.images import sniff_media_type
from localvl.settings import Settings

T = TypeVar("T")


def _require_key(request: Request) -> None:
    check_api_key(request, request.app.state.settings.api_key)


router = APIRouter(dependencies=[Depends(_require_key)])


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _names(request: Request) -> ModelNames:
    return request.app.state.model_names


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _resolve_model(names: ModelNames, requested: str) -> ServedModel:
    served = names.resolve(requested)
    if served is None:
        raise NotFoundError(f"model: {requested}")
    return served


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (so its generation stops)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


async def _form_body(request: Request, names: ModelNames) -> MessagesRequest:
    """The seed's original interface: a form with ``prompt`` and an optional ``image`` file."""
    form = await request.form()
    prompt = form.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("prompt: a non-empty form field is required")
    content: list[dict[str, Any]] = []
    upload = form.get("image")
    if upload is not None and not isinstance(upload, str):
        data = await upload.read()
        media_type = sniff_media_type(data)
        if media_type is None:
            raise InvalidRequestError("image: the file is not a jpeg, png, gif or webp image")
        content.append(
            {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()}}
        )
    content.append({"type": "text", "text": prompt})
    body: dict[str, Any] = {"model": form.get("model") or names.default.name, "messages": [{"role": "user", "content": content}]}
    max_tokens = form.get("max_tokens") or "1024"
    try:
        body["max_tokens"] = int(str(max_tokens))
    except ValueError:
        raise InvalidRequestError("max_tokens: must be an integer") from None
    if isinstance(system := form.get("system"), str) and system:
        body["system"] = system
    return MessagesRequest.model_validate(body, strict=False)


@router.post("/v1/messages")
async def create_message(request: Request) -> Any:
    names, engine, settings = _names(request), _engine(request), _settings(request)
    if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        body = await _form_body(request, names)
    else:
        body = parse_body(MessagesRequest, await request.body())
    _resolve_model(names, body.model)
    message_id = new_id("msg_")
    generation = await anyio.to_thread.run_sync(convert.generation_request, message_id, body)
    stream = await engine.submit(generation)
    if body.stream:
        return StreamingResponse(
            message_events(stream, message_id, body.model, settings.ping_interval),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    message = await _until_disconnect(request, collect_message(stream, message_id, body.model))
    return JSONResponse(message)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Any:
    body = parse_body(CountTokensRequest, await request.body())
    _resolve_model(_names(request), body.model)
    conversation = await anyio.to_thread.run_sync(convert.conversation_from, body)
    return {"input_tokens": await _engine(request).count_tokens(conversation)}


def _model_json(model_id: str, served: ServedModel) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": served.name if model_id == served.name else f"{model_id} (served by {served.name})",
        "created_at": served.created_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
        "lifecycle": "active",
        "max_input_tokens": served.context_length,
        "max_tokens": served.context_length,
    }


@router.get("/v1/models")
async def list_models(
    request: Request, limit: int = 20, after_id: str | None = None, before_id: str | None = None
) -> Any:
    if not 1 <= limit <= 1000:
        raise InvalidRequestError("limit: must be between 1 and 1000")
    entries = _names(request).listed()
    ids = [model_id for model_id, _ in entries]
    for cursor in (after_id, before_id):
        if cursor is not None and cursor not in ids:
            raise InvalidRequestError(f"unknown model id in pagination cursor: {cursor}")
    if after_id is not None:
        window = entries[ids.index(after_id) + 1 :]
        page, has_more = window[:limit], len(window) > limit
    elif before_id is not None:
        window = entries[: ids.index(before_id)]
        page, has_more = window[-limit:], len(window) > limit
    else:
        page, has_more = entries[:limit], len(entries) > limit
    data = [_model_json(model_id, served) for model_id, served in page]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Any:
    return _model_json(model_id, _resolve_model(_names(request), model_id))
