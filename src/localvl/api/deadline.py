"""A generation's time limit (``--request-timeout``): past it the generation is aborted and the
client gets Anthropic's 504 ``timeout_error`` (an ``error`` event once a stream has begun)."""

from __future__ import annotations

import asyncio
import time

from localvl.engine.events import Event
from localvl.engine.protocol import GenerationStream
from localvl.errors import RequestTimeoutError


class DeadlineStream:
    """``stream``, ending with ``RequestTimeoutError`` once ``seconds`` have passed since now."""

    def __init__(self, stream: GenerationStream, seconds: float) -> None:
        self.stream = stream
        self.seconds = seconds
        self.request_id = stream.request_id
        self.input_tokens = stream.input_tokens
        self._deadline = time.monotonic() + seconds

    def __aiter__(self) -> DeadlineStream:
        return self

    async def __anext__(self) -> Event:
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self.stream.__anext__(), remaining)
        except asyncio.TimeoutError:
            await self.stream.aclose()  # frees the request's place in the batch
            raise RequestTimeoutError(
                f"the request ran longer than this server's limit of {self.seconds:g} seconds; "
                "ask for fewer max_tokens or stream the response"
            ) from None

    async def aclose(self) -> None:
        await self.stream.aclose()
