"""Server-sent events: framing and keep-alive pings."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, TypeVar

from localvl.json_lines import dumps

T = TypeVar("T")


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One event with both an ``event:`` line and a ``data:`` line (SDKs dispatch on the name)."""
    return f"event: {name}\ndata: {dumps(data)}\n\n".encode()


class Heartbeat:
    """A marker yielded by ``with_heartbeats`` when ``interval`` passed with nothing to send."""


HEARTBEAT = Heartbeat()


async def with_heartbeats(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | Heartbeat]:
    """Yield from ``source``, inserting ``HEARTBEAT`` whenever it is silent for ``interval`` seconds."""
    pending: asyncio.Task[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield HEARTBEAT
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            try:
                await pending  # let the source see its cancellation before it is closed
            except BaseException:
                pass
        # Closed (the client left): close the source now, not when it is collected — closing is
        # what aborts the generation behind it.
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()
