"""Neutral engine events → an OpenAI ``chat.completion`` or its ``chat.completion.chunk`` stream.

A request with ``n`` choices runs as ``n`` engine requests; their events are merged by choice index.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Callable, Iterator

from localvl import __version__
from localvl.api.openai.errors import error_json
from localvl.api.sse import HEARTBEAT, with_heartbeats
from localvl.engine.events import Event, FinishReason, Finished, TextDelta, ThinkingDelta, TokenLogprob, ToolCallEvent
from localvl.engine.protocol import GenerationStream
from localvl.errors import InternalError, LocalvlError
from localvl.json_lines import dumps

logger = logging.getLogger(__name__)

FINISH_REASONS: dict[FinishReason, str] = {
    "eos": "stop",
    "tool_use": "tool_calls",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "context_window": "length",
}
FINGERPRINT = f"localvl-{__version__}"


def call_id(event: ToolCallEvent) -> str:
    """OpenAI-shaped id (``call_…``) for the engine's tool call."""
    return "call_" + event.id.removeprefix("toolu_")


def tool_call_json(event: ToolCallEvent) -> dict[str, Any]:
    # A call the token limit cut off keeps the arguments as written, unclosed, as OpenAI's API
    # returns them (finish_reason "length"): closed, they would pass for a whole call.
    arguments = json.dumps(event.input, ensure_ascii=False) if event.partial is None else event.partial
    return {"id": call_id(event), "type": "function", "function": {"name": event.name, "arguments": arguments}}


def logprob_json(entry: TokenLogprob) -> dict[str, Any]:
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": list(entry.bytes),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in entry.top],
    }


def logprobs_json(entries: list[TokenLogprob] | tuple[TokenLogprob, ...], wanted: bool) -> dict[str, Any] | None:
    return {"content": [logprob_json(e) for e in entries], "refusal": None} if wanted else None


def usage_json(finished: list[Finished]) -> dict[str, Any]:
    first = finished[0].usage
    prompt = first.input_tokens + first.cache_read_input_tokens + first.cache_creation_input_tokens
    completion = sum(f.usage.output_tokens for f in finished)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # choices of one request run side by side: the smallest hit is what every choice had
        "prompt_tokens_details": {"cached_tokens": min(f.usage.cache_read_input_tokens for f in finished)},
        "completion_tokens_details": {"reasoning_tokens": sum(f.usage.reasoning_tokens for f in finished)},
    }


async def merged(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several streams as ``(choice index, event)``, as they come. Closing it closes all."""
    queue: asyncio.Queue[tuple[int, Event | LocalvlError | None]] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
            await queue.put((index, None))
        except LocalvlError as error:
            await queue.put((index, error))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, LocalvlError):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        for stream in streams:
            await stream.aclose()


def usage_counts(finished: list[Finished]) -> dict[str, int]:
    """The request's token counts in the neutral (Anthropic) vocabulary: for logs and rate limits."""
    first = finished[0].usage
    return {
        "input_tokens": first.input_tokens,
        "cache_creation_input_tokens": first.cache_creation_input_tokens,
        "cache_read_input_tokens": first.cache_read_input_tokens,
        "output_tokens": sum(f.usage.output_tokens for f in finished),
    }


class Choices:
    """What each choice has said so far: enough to write the whole ``chat.completion``."""

    def __init__(self, count: int) -> None:
        self.texts: list[list[str]] = [[] for _ in range(count)]
        self.thoughts: list[list[str]] = [[] for _ in range(count)]
        self.calls: list[list[dict[str, Any]]] = [[] for _ in range(count)]
        self.entries: list[list[TokenLogprob]] = [[] for _ in range(count)]
        self.finished: list[Finished | None] = [None] * count

    def add(self, index: int, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.texts[index].append(event.text)
            self.entries[index].extend(event.logprobs)
        elif isinstance(event, ThinkingDelta):
            self.thoughts[index].append(event.text)
        elif isinstance(event, ToolCallEvent):
            self.calls[index].append(tool_call_json(event))
        elif isinstance(event, Finished):
            self.finished[index] = event

    def done(self) -> list[Finished]:
        """Every choice's end; ``InternalError`` if one ended without one."""
        done = [f for f in self.finished if f is not None]
        if len(done) != len(self.finished):
            raise InternalError("generation ended without a result")
        return done

    def _message(self, i: int) -> dict[str, Any]:
        text = "".join(self.texts[i])
        calls = self.calls[i]
        out: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
        if self.thoughts[i]:
            out["reasoning_content"] = "".join(self.thoughts[i])  # the field vLLM and DeepSeek use
        if calls:
            out["tool_calls"] = calls
        return out

    def completion(self, completion_id: str, model: str, created: int, logprobs: bool) -> dict[str, Any]:
        done = self.done()
        choices = [
            {
                "index": i,
                "message": self._message(i),
                "logprobs": logprobs_json(self.entries[i], logprobs),
                "finish_reason": FINISH_REASONS[done[i].reason],
            }
            for i in range(len(done))
        ]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": usage_json(done),
        }


# Called once a request ends normally: its token counts (neutral vocabulary) and its completion.
OnDone = Callable[[dict[str, int], dict[str, Any]], None]


async def collect_completion(
    streams: list[GenerationStream], completion_id: str, model: str, created: int, logprobs: bool = False,
    on_done: OnDone | None = None,
) -> dict[str, Any]:
    choices = Choices(len(streams))
    async for index, event in merged(streams):
        choices.add(index, event)
    completion = choices.completion(completion_id, model, created, logprobs)
    if on_done is not None:
        on_done(usage_counts(choices.done()), completion)
    return completion


def _data(payload: dict[str, Any]) -> bytes:
    return f"data: {dumps(payload)}\n\n".encode()


async def completion_chunks(
    streams: list[GenerationStream],
    completion_id: str,
    model: str,
    created: int,
    include_usage: bool,
    ping_interval: float,
    logprobs: bool = False,
    on_done: OnDone | None = None,
) -> AsyncIterator[bytes]:
    """The SSE stream: a role chunk per choice, content chunks, a finish chunk per choice,
    the usage chunk when asked for, then ``[DONE]``. Closing it (client gone) aborts every choice."""

    # Asked for usage, every chunk carries the field: null until the last (OpenAI's documented shape).
    usage: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _data({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                      "system_fingerprint": FINGERPRINT, "choices": choices, **usage, **extra})

    def choice(index: int, delta: dict[str, Any], finish: str | None = None, entries: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs_json(entries, logprobs and bool(entries)), "finish_reason": finish}

    calls = [0] * len(streams)  # tool calls so far, per choice: each call's index
    seen = Choices(len(streams))  # what each choice said: the usage chunk, and on_done's completion
    # Chunks ready together go out in one write (each is a syscall and wakes the client).
    yield b"".join(chunk([choice(index, {"role": "assistant", "content": ""})]) for index in range(len(streams)))
    tail = b""
    try:
        async for item in with_heartbeats(merged(streams), ping_interval):
            if item is HEARTBEAT:
                yield b": ping\n\n"
                continue
            index, event = item  # type: ignore[misc]
            seen.add(index, event)
            if isinstance(event, TextDelta):
                yield chunk([choice(index, {"content": event.text}, entries=event.logprobs)])
            elif isinstance(event, ThinkingDelta):
                yield chunk([choice(index, {"reasoning_content": event.text})])
            elif isinstance(event, ToolCallEvent):
                call = tool_call_json(event)
                arguments = call["function"]["arguments"]
                call["function"]["arguments"] = ""
                yield (chunk([choice(index, {"tool_calls": [{"index": calls[index], **call}]})])
                       + chunk([choice(index, {"tool_calls": [{"index": calls[index], "function": {"arguments": arguments}}]})]))
                calls[index] += 1
            elif isinstance(event, Finished):
                yield chunk([choice(index, {}, FINISH_REASONS[event.reason])])
        done = seen.done()
        if on_done is not None:
            on_done(usage_counts(done), seen.completion(completion_id, model, created, logprobs))
        if include_usage:
            tail = chunk([], usage=usage_json(done))
    except LocalvlError as error:
        tail = _data({"error": error_json(error)})
    except Exception as error:  # after the headers went out, an error chunk is the only way to say it
        logger.error("stream failed: %s", type(error).__name__)
        tail = _data({"error": error_json(InternalError("the server failed while streaming this response"))})
    yield tail + b"data: [DONE]\n\n"


def replayed_chunks(completion: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """The chunk stream of a finished completion (a response-cache hit), shaped as a live one:
    per choice a role chunk, its reasoning, content and tool calls, its finish chunk; then usage."""

    usage: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _data({"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
                      "model": completion["model"], "system_fingerprint": completion.get("system_fingerprint"),
                      "choices": choices, **usage, **extra})

    def choice(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    for entry in completion["choices"]:
        index, message = entry["index"], entry["message"]
        yield chunk([choice(index, {"role": "assistant", "content": ""})])
        if message.get("reasoning_content"):
            yield chunk([choice(index, {"reasoning_content": message["reasoning_content"]})])
        if message.get("content"):
            yield chunk([choice(index, {"content": message["content"]}, logprobs=entry.get("logprobs"))])
        for number, call in enumerate(message.get("tool_calls") or []):
            header = {**call, "function": {**call["function"], "arguments": ""}}
            yield chunk([choice(index, {"tool_calls": [{"index": number, **header}]})])
            yield chunk([choice(index, {"tool_calls": [{"index": number, "function": {"arguments": call["function"]["arguments"]}}]})])
        yield chunk([choice(index, {}, entry["finish_reason"])])
    if include_usage:
        yield chunk([], usage=completion["usage"])
    yield b"data: [DONE]\n\n"
