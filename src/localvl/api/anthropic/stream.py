"""Neutral engine events -> Anthropic's Message JSON or its SSE event sequence."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from localvl.api.anthropic.errors import error_event
from localvl.api.sse import HEARTBEAT, sse_event, with_heartbeats
from localvl.engine.events import FinishReason, Finished, TextDelta, Usage
from localvl.engine.protocol import GenerationStream
from localvl.errors import InternalError, LocalvlError

logger = logging.getLogger(__name__)

STOP_REASONS: dict[FinishReason, str] = {
    "eos": "end_turn",
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


async def collect_message(stream: GenerationStream, message_id: str, model: str) -> dict[str, Any]:
    """Run a generation to the end and return the whole Message."""
    text: list[str] = []
    finished: Finished | None = None
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                finished = event
    finally:
        await stream.aclose()
    if finished is None:
        raise InternalError("generation ended without a result")
    content = [{"type": "text", "text": "".join(text)}] if text else []
    return message_json(message_id, model, content, finished, finished.usage)


async def message_events(
    stream: GenerationStream, message_id: str, model: str, ping_interval: float
) -> AsyncIterator[bytes]:
    """The SSE stream of one message. Closing this iterator (client gone) aborts the generation."""
    start_usage = Usage(input_tokens=stream.input_tokens, output_tokens=0)
    start = message_json(message_id, model, [], None, start_usage)
    yield sse_event("message_start", {"type": "message_start", "message": start})
    yield sse_event("ping", {"type": "ping"})
    block_open = False
    try:
        async for event in with_heartbeats(stream, ping_interval):
            if event is HEARTBEAT:
                yield sse_event("ping", {"type": "ping"})
            elif isinstance(event, TextDelta):
                if not block_open:
                    block_open = True
                    yield sse_event(
                        "content_block_start",
                        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    )
                yield sse_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": event.text}},
                )
            elif isinstance(event, Finished):
                if block_open:
                    yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
                usage = usage_json(event.usage)
                usage.pop("service_tier")
                yield sse_event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": STOP_REASONS[event.reason], "stop_sequence": event.stop_sequence},
                        "usage": usage,
                    },
                )
                yield sse_event("message_stop", {"type": "message_stop"})
    except LocalvlError as error:
        yield sse_event("error", error_event(error))
    except Exception as error:  # after the headers went out, an error event is the only way to say it
        logger.error("stream failed: %s", type(error).__name__)
        yield sse_event("error", error_event(InternalError("the server failed while streaming this response")))
    finally:
        await stream.aclose()
