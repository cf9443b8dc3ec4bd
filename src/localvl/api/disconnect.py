"""Stopping work whose client has gone: a non-streaming request has nobody to read its answer."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (so its generation stops); then
    ``ClientDisconnect``, which the middleware counts as the client's leaving (499), not a failure."""
    task = asyncio.ensure_future(work)
    left = False

    async def watch() -> None:
        nonlocal left
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                left = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if left and (current is None or not current.cancelling()):  # the work, not this handler, was cancelled
            raise ClientDisconnect() from None
        raise
    finally:
        watcher.cancel()
