"""Anthropic's Messages API routes: messages, count_tokens, models."""

from __future__ import annotations

import base64
import dataclasses
import functools
from typing import Any, Callable

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData
from fastapi.responses import JSONResponse, StreamingResponse

from localvl.api.anthropic import convert
from localvl.api.anthropic.schemas import CountTokensRequest, MessagesRequest
from localvl.api.anthropic.threads import ThreadStore
from localvl.api.validation import load_json_object, parse_body, parse_value
from localvl.api.anthropic.stream import Output, collect_message, message_events, replayed_events
from localvl.api.auth import require_api_key
from localvl.api.deadline import Deadline
from localvl.api.disconnect import until_disconnect
from localvl.api.forms import form_bytes, form_text, read_form, read_urlencoded
from localvl.api.limits import charge_unfinished, rate_limited
from localvl.api.middleware import new_id
from localvl.prompt.outputs import tool_call_id
from localvl.api.model_names import ModelNames
from localvl.api.response_cache import request_key
from localvl.api.signatures import ThinkingSigner
from localvl.engine.protocol import Engine, GenerationStream
from localvl.engine.sequence import INTERACTIVE
from localvl.errors import InvalidRequestError, NotFoundError
from localvl.media.context import Media
from localvl.media.fetch import fetch_all
from localvl.media.images import sniff_media_type
from localvl.settings import Settings


router = APIRouter(dependencies=[Depends(require_api_key)])


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _names(request: Request) -> ModelNames:
    return request.app.state.model_names


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _signer(request: Request) -> ThinkingSigner:
    return request.app.state.signer


async def _form_body(request: Request, names: ModelNames) -> MessagesRequest:
    """The seed's original interface: a form with ``prompt`` and an optional ``image`` file."""
    multipart = request.headers["content-type"].startswith("multipart/form-data")
    if multipart:
        form = await read_form(request, request.app.state.settings.max_request_bytes)
    else:
        form = await read_urlencoded(request)
    try:
        return await _form_message(form, multipart, names)
    finally:
        await form.close()


async def _form_text(form: FormData, name: str) -> str:
    """A text field's value (both form readers leave fields as latin-1: ``form_text`` reads them);
    sent as a file (curl's ``-F system=@prompt.txt``), the file's text."""
    value = form.get(name)
    if value is None:
        return ""
    if isinstance(value, str):
        return form_text(value)
    try:
        return (await value.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{name}: the file is not UTF-8 text") from None


async def _form_message(form: FormData, multipart: bool, names: ModelNames) -> MessagesRequest:
    prompt = await _form_text(form, "prompt")
    if not prompt.strip():
        raise InvalidRequestError("prompt: a non-empty form field is required")
    content: list[dict[str, Any]] = []
    upload = form.get("image")
    if isinstance(upload, str) and upload and not multipart:
        raise InvalidRequestError("image: send the image as a file part of a multipart/form-data form")
    # Without a filename the image arrives as a field; an HTML form's empty file input sends no bytes.
    data = b"" if upload is None or not multipart else await form_bytes(upload)
    if data:
        media_type = sniff_media_type(data)
        if media_type is None:
            raise InvalidRequestError("image: the file is not a jpeg, png, gif or webp image")
        content.append(
            {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()}}
        )
    content.append({"type": "text", "text": prompt})
    model = await _form_text(form, "model")
    body: dict[str, Any] = {"model": model.strip() or names.default.name,
                            "messages": [{"role": "user", "content": content}]}
    max_tokens = (await _form_text(form, "max_tokens")).strip() or "1024"
    try:
        body["max_tokens"] = int(max_tokens)
    except ValueError:
        raise InvalidRequestError("max_tokens: must be an integer") from None
    if system := await _form_text(form, "system"):
        body["system"] = system
    return parse_value(MessagesRequest, body, "")  # a 400 naming the field, as for a JSON body


async def media_for(state: Any, owner: str, body: Any) -> Media:
    """The request's image and document URLs fetched behind the SSRF guard, its uploaded files
    read (``owner``'s own only), and the media limits."""
    settings: Settings = state.settings
    policy = settings.url_policy()
    images = await fetch_all(convert.image_urls(body), policy, settings.max_image_bytes)
    documents = await fetch_all(convert.document_urls(body), policy, settings.max_pdf_bytes, accept=("application/pdf",))
    uploaded: dict[str, bytes] = {}
    wanted = convert.file_ids(body)
    if wanted:
        store = await state.store.files()
        for file_id, where in wanted:
            try:
                uploaded[convert.FILE + file_id] = (await store.read(owner, file_id))[1]
            except NotFoundError as error:
                raise InvalidRequestError(f"{where}: {error.message}") from None
    return settings.media({**images, **documents, **uploaded})


def _threaded(
    request: Request, data: dict[str, Any], size: int
) -> tuple[MessagesRequest, Callable[[str, dict[str, Any] | None], None]]:
    """A request under ``thread``: the full conversation it stands for, and what to do once answered
    (keep the conversation under the reply's id; free the thread it continued)."""
    threads: ThreadStore = request.app.state.threads
    owner = request.state.owner
    full, previous = threads.begin(data, owner)
    try:
        body = parse_value(MessagesRequest, full, "")
    except BaseException:
        threads.end(previous, continued=False)
        raise

    def on_done(message_id: str, message: dict[str, Any] | None) -> None:
        threads.end(previous, continued=message is not None)
        if message is not None:
            threads.store(message_id, owner, full, message, size=size)

    return body, on_done


async def start_message(
    state: Any, owner: str, body: MessagesRequest, message_id: str, priority: int = INTERACTIVE,
    deadline: Deadline | None = None,
) -> tuple[GenerationStream, Output]:
    """Everything a Message needs before its events: media, conversion, submission to the engine
    (within ``deadline``, which then holds the stream to it too)."""
    signer: ThinkingSigner = state.signer
    media = await (media_for(state, owner, body) if deadline is None else deadline.within(media_for(state, owner, body)))
    generation = await anyio.to_thread.run_sync(convert.generation_request, message_id, body, signer.recover, media)
    generation.priority = priority
    stream: GenerationStream = (
        await state.engine.submit(generation) if deadline is None else await deadline.submit(state.engine, generation)
    )
    output = Output(message_id, body.model, signer, show_thinking=(body.thinking or {}).get("display") != "omitted")
    return stream, output


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/messages", dependencies=[Depends(rate_limited)])
async def create_message(request: Request) -> Any:
    names, settings = _names(request), _settings(request)
    deadline = Deadline(settings.request_timeout)
    on_done = None
    key = None
    if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        body = await deadline.read(_form_body(request, names))
    else:
        raw = await deadline.read(request.body())
        data = load_json_object(raw) if b'"thread"' in raw else None
        if data is not None and data.get("thread") is not None:
            body, on_done = _threaded(request, data, len(raw))
        else:
            body = parse_body(MessagesRequest, raw)
            key = request_key(request.app.state, request.state.owner, load_json_object(raw), names.require(body.model).name,
                              "anthropic") if request.app.state.response_cache is not None else None
    served = names.require(body.model).name
    message_id = new_id("msg_")
    cache = request.app.state.response_cache
    if key is not None:
        hit = await cache.get(key)
        request.scope["state"].setdefault("response_headers", {})["x-localvl-cache"] = "hit" if hit else "miss"
        if hit is not None:
            request.state.model, request.state.cache_hit = served, True
            # Nothing was computed or written to the prefix cache this time: the whole prompt reads as cached.
            usage = dict(hit["usage"])
            prompt = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
            usage.update(input_tokens=0, cache_creation_input_tokens=0, cache_read_input_tokens=prompt)
            request.state.usage = usage
            # Fresh tool_use ids too: a client repeating a conversation's start gets calls of its own.
            content = [dict(b, id=tool_call_id()) if b.get("type") == "tool_use" else b for b in hit.get("content", [])]
            message = dict(hit, id=message_id, model=body.model, usage=usage, content=content)
            if body.stream:
                return StreamingResponse(replayed_events(message), media_type="text/event-stream", headers=SSE_HEADERS)
            return JSONResponse(message)
    try:
        stream, output = await start_message(request.app.state, request.state.owner, body, message_id, deadline=deadline)
    except BaseException:
        if on_done is not None:
            on_done(message_id, None)
        raise
    charge_unfinished(request, [stream])
    request.state.model = served  # for the access log: the served name
    thread_done = None if on_done is None else functools.partial(on_done, message_id)

    def done(message: dict[str, Any] | None) -> None:
        if message is not None:
            request.state.usage = message["usage"]  # for the access log: counts only
            if key is not None:
                request.scope["state"].setdefault("finishers", []).append(functools.partial(cache.put, key, message))
        if thread_done is not None:
            thread_done(message)

    output = dataclasses.replace(output, on_done=done)
    if body.stream:
        return StreamingResponse(message_events(stream, output, settings.ping_interval),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    message = await until_disconnect(request, collect_message(stream, output))
    return JSONResponse(message)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Any:
    body = parse_body(CountTokensRequest, await request.body())
    _names(request).require(body.model)
    media = await media_for(request.app.state, request.state.owner, body)
    conversation = await anyio.to_thread.run_sync(convert.conversation_from, body, _signer(request).recover, media)
    return {"input_tokens": await _engine(request).count_tokens(conversation)}
