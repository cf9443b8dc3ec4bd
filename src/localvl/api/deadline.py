"""A request's time limit (``--request-timeout``), counted from when its handler began: past it the
generation is aborted and the client gets Anthropic's 504 ``timeout_error`` (an ``error`` event
once a stream has begun)."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, TypeVar

from localvl.conversation import GenerationRequest
from localvl.engine.events import Event
from localvl.engine.protocol import Engine, GenerationStream
from localvl.errors import RequestTimeoutError

T = TypeVar("T")


class Deadline:
    """``seconds`` from now, for everything a request waits on: the hand-off to the engine and
    every event after it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._at - time.monotonic()

    def error(self) -> RequestTimeoutError:
        # Streams are held to the same limit: streaming is no way around it.
        return RequestTimeoutError(
            f"the request ran longer than this server's limit of {self.seconds:g} seconds; "
            "ask for fewer max_tokens, or try again when the server is less busy"
        )

    async def within(self, work: Awaitable[T]) -> T:
        """``work`` (fetching a request's media URLs) within the time left: a slow image server
        cannot stretch a request past the limit."""
        try:
            return await asyncio.wait_for(work, max(self.remaining(), 0))
        except asyncio.TimeoutError:
            raise self.error() from None

    async def read(self, body: Awaitable[T]) -> T:
        """``body`` (the request's body or form) within the time left: a client that sends its
        headers and then withholds or dribbles the body (slowloris) gets a 504 like any other
        request past the limit, instead of holding its connection and its place open forever."""
        try:
            return await asyncio.wait_for(body, max(self.remaining(), 0))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within this server's limit of {self.seconds:g} seconds"
            ) from None

    async def submit(self, engine: Engine, request: GenerationRequest) -> DeadlineStream:
        """``engine.submit`` within the time left, so an engine that never takes the request (a hung
        engine process, a full pipe) ends it with a 504 instead of leaving the client waiting."""
        try:
            # Cancelling the submit takes the request back from the engine (its abort).
            stream = await asyncio.wait_for(engine.submit(request), max(self.remaining(), 0))
        except asyncio.TimeoutError:
            raise self.error() from None
        return DeadlineStream(stream, self)


class DeadlineStream:
    """``stream``, ending with ``RequestTimeoutError`` once ``deadline`` has passed."""

    def __init__(self, stream: GenerationStream, deadline: Deadline) -> None:
        self.stream = stream
        self.deadline = deadline
        self.request_id = stream.request_id
        self.input_tokens = stream.input_tokens

    @property
    def generated(self) -> int:
        return self.stream.generated

    def __aiter__(self) -> DeadlineStream:
        return self

    async def __anext__(self) -> Event:
        remaining = self.deadline.remaining()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self.stream.__anext__(), remaining)
        except asyncio.TimeoutError:
            await self.stream.aclose()  # frees the request's place in the batch
            raise self.deadline.error() from None

    async def aclose(self) -> None:
        await self.stream.aclose()
