"""Neutral engine events -> Anthropic's Message JSON or its SSE event sequence."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from localvl.api.anthropic.errors import error_event
from localvl.api.sse import HEARTBEAT, sse_event, with_heartbeats
from localvl.api.signatures import ThinkingSigner
from localvl.engine.events import FinishReason, Finished, TextDelta, ThinkingDelta, ToolCallEvent, Usage
from localvl.engine.protocol import GenerationStream
from localvl.errors import InternalError, LocalvlError

logger = logging.getLogger(__name__)

STOP_REASONS: dict[FinishReason, str] = {
    "eos": "end_turn",
    "tool_use": "tool_use",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "context_window": "model_context_window_exceeded",
}


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "service_tier": "standard",
    }


def message_json(
    message_id: str, model: str, content: list[dict[str, Any]], finished: Finished | None, usage: Usage
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": STOP_REASONS[finished.reason] if finished else None,
        "stop_sequence": finished.stop_sequence if finished else None,
        "usage": usage_json(usage),
    }


@dataclass(frozen=True)
class Output:
    """How one message is written: its id and model name, the key that signs its thinking, and
    whether thinking text is shown (``display: omitted`` keeps it inside the signature only)."""

    message_id: str
    model: str
    signer: ThinkingSigner | None = None
    show_thinking: bool = True
    # Called once: with the finished Message, or with None if the generation failed or was abandoned.
    on_done: Callable[[dict[str, Any] | None], None] | None = None

    def done(self, message: dict[str, Any] | None) -> None:
        if self.on_done is not None:
            self.on_done(message)

    def signature(self, thinking: str) -> str:
        if self.signer is None:
            return ""
        return self.signer.sign(thinking, embed=not self.show_thinking)


class _Blocks:
    """Content blocks built from engine events, and the SSE frames that stream them.

    Consecutive text (or thinking) deltas extend one block; a tool call is a block of its own.
    Block indices count up from 0, as the SDKs require.
    """

    def __init__(self, output: Output) -> None:
        self.output = output
        self.content: list[dict[str, Any]] = []
        self._open: str | None = None  # the type of the block being streamed
        self._thinking: list[str] = []

    def _start(self, block: dict[str, Any]) -> Iterator[bytes]:
        yield from self.close()
        self.content.append(block)
        self._open = block["type"]
        yield sse_event("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                                "content_block": dict(block)})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        index = len(self.content) - 1
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def add(self, event: TextDelta | ThinkingDelta | ToolCallEvent) -> Iterator[bytes]:
        if isinstance(event, TextDelta):
            if not event.text:
                return
            if self._open != "text":
                yield from self._start({"type": "text", "text": ""})
            self.content[-1]["text"] += event.text
            yield self._delta({"type": "text_delta", "text": event.text})
        elif isinstance(event, ThinkingDelta):
            if not event.text:
                return
            if self._open != "thinking":
                yield from self._start({"type": "thinking", "thinking": "", "signature": ""})
                self._thinking = []
            self._thinking.append(event.text)
            if self.output.show_thinking:
                self.content[-1]["thinking"] += event.text
                yield self._delta({"type": "thinking_delta", "thinking": event.text})
        else:
            yield from self._start({"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
            self.content[-1]["input"] = event.input
            yield self._delta({"type": "input_json_delta", "partial_json": json.dumps(event.input, ensure_ascii=False)})
            yield from self.close()

    def close(self) -> Iterator[bytes]:
        if self._open is None:
            return
        if self._open == "thinking":
            signature = self.output.signature("".join(self._thinking))
            self.content[-1]["signature"] = signature
            yield self._delta({"type": "signature_delta", "signature": signature})
        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})
        self._open = None


async def collect_message(stream: GenerationStream, output: Output) -> dict[str, Any]:
    """Run a generation to the end and return the whole Message."""
    blocks = _Blocks(output)
    finished: Finished | None = None
    message: dict[str, Any] | None = None
    try:
        async for event in stream:
            if isinstance(event, Finished):
                finished = event
            else:
                for _ in blocks.add(event):
                    pass
        if finished is None:
            raise InternalError("generation ended without a result")
        for _ in blocks.close():
            pass
        message = message_json(output.message_id, output.model, blocks.content, finished, finished.usage)
        return message
    finally:
        output.done(message)
        await stream.aclose()


async def message_events(stream: GenerationStream, output: Output, ping_interval: float) -> AsyncIterator[bytes]:
    """The SSE stream of one message. Closing this iterator (client gone) aborts the generation.

    Events that are ready together go out in one write (a block's start with its first delta;
    the last block's end, the message's delta and its stop): each write is a syscall and wakes
    the client, measured at ~31 per 128-token answer before.
    """
    start_usage = Usage(input_tokens=stream.input_tokens, output_tokens=0)
    start = message_json(output.message_id, output.model, [], None, start_usage)
    yield sse_event("message_start", {"type": "message_start", "message": start}) + sse_event("ping", {"type": "ping"})
    blocks = _Blocks(output)
    message: dict[str, Any] | None = None
    try:
        async for event in with_heartbeats(stream, ping_interval):
            if event is HEARTBEAT:
                yield sse_event("ping", {"type": "ping"})
            elif isinstance(event, Finished):
                frames = list(blocks.close())
                usage = usage_json(event.usage)
                usage.pop("service_tier")
                frames.append(sse_event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": STOP_REASONS[event.reason], "stop_sequence": event.stop_sequence},
                        "usage": usage,
                    },
                ))
                frames.append(sse_event("message_stop", {"type": "message_stop"}))
                message = message_json(output.message_id, output.model, blocks.content, event, event.usage)
                yield b"".join(frames)
            else:
                frames = b"".join(blocks.add(event))  # type: ignore[arg-type]
                if frames:
                    yield frames
    except LocalvlError as error:
        yield sse_event("error", error_event(error))
    except Exception as error:  # after the headers went out, an error event is the only way to say it
        logger.error("stream failed: %s", type(error).__name__)
        yield sse_event("error", error_event(InternalError("the server failed while streaming this response")))
    finally:
        output.done(message)
        await stream.aclose()


def replayed_events(message: dict[str, Any]) -> Iterator[bytes]:
    """The SSE stream of a finished Message (a response-cache hit): the same events a live stream
    of it sends, one delta per block."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None,
                 usage=dict(message["usage"], output_tokens=0))
    yield sse_event("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        empty = {"text": {"text": ""}, "thinking": {"thinking": "", "signature": ""}, "tool_use": {"input": {}}}.get(kind, {})
        yield sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                "content_block": {**block, **empty}})
        deltas: list[dict[str, Any]] = []
        if kind == "text":
            deltas.append({"type": "text_delta", "text": block["text"]})
        elif kind == "thinking":
            if block["thinking"]:
                deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "tool_use":
            deltas.append({"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)})
        for delta in deltas:
            yield sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": index})
    usage = {k: v for k, v in message["usage"].items() if k != "service_tier"}
    yield sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
                                      "usage": usage})
    yield sse_event("message_stop", {"type": "message_stop"})
