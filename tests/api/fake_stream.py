"""A stand-in for an engine's generation stream, for the dialects' SSE encoder tests."""

from __future__ import annotations

import asyncio


class FakeStream:
    """Yields ``items`` (raising those that are exceptions), ``delay`` seconds apart."""

    def __init__(self, items, delay=0.0):
        self.request_id = "r1"
        self.input_tokens = 7
        self.generated = 0
        self.items = list(items)
        self.delay = delay
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self):
        self.closed = True
