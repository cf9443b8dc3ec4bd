"""What the API layer needs from an engine, whichever engine it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable

from localvl.conversation import Conversation, GenerationRequest
from localvl.engine.events import Event


@dataclass(frozen=True)
class ModelInfo:
    """What clients may learn about the served model."""

    name_or_path: str
    model_type: str
    context_length: int


@runtime_checkable
class GenerationStream(Protocol):
    """The events of one admitted request. Closing it early aborts the generation."""

    request_id: str
    input_tokens: int  # the whole prompt
    generated: int  # outputs so far, about one per token (what an unfinished request is charged)

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def __anext__(self) -> Event: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, request: GenerationRequest) -> GenerationStream:
        """Render and validate the request, queue it, and return its event stream.

        Raises ``LocalvlError`` for requests that cannot run (a prompt longer than the context,
        a template that rejects the conversation) before anything is streamed.
        """
        ...

    async def count_tokens(self, conversation: Conversation) -> int:
        """Exactly the ``input_tokens`` that submitting this conversation would report."""
        ...

    def abort(self, request_id: str) -> None: ...
