"""Between the engine thread and the asyncio side: each request's state and event queue.

The engine thread produces events into an ``Outbox`` during a step and hands them to each event
loop in one call at its end; the asyncio side reads them from the request's ``Stream``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from localvl.engine.detokenizer import IncrementalDetokenizer
from localvl.engine.events import Event, Finished, TextDelta, TokenLogprob
from localvl.engine.runner import PromptState
from localvl.engine.sampling import ResolvedSampling
from localvl.engine.sequence import Sequence
from localvl.engine.stops import StopMatcher
from localvl.errors import LocalvlError
from localvl.prompt.outputs import OutputParser


class Outbox:
    """Events produced during one engine step, handed to each event loop in one call.

    One ``call_soon_threadsafe`` per event would wake the loop (a syscall) per token per request.
    """

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event | LocalvlError]]] = {}

    def add(self, job: Job, item: Event | LocalvlError) -> None:
        self._items.setdefault(job.loop, []).append((job, item))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, batch in items.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                for job, _ in batch:
                    job.cancelled.set()


def _deliver(batch: list[tuple[Job, Event | LocalvlError]]) -> None:
    for job, item in batch:
        job.events.put_nowait(item)


@dataclass(eq=False)
class Job:
    """A request's state that only the engine side needs."""

    prompt: PromptState
    sampling: ResolvedSampling
    stop_sequences: tuple[str, ...]
    seed: int | None
    context_limited: bool  # max_new_tokens was cut to what the context has left
    loop: asyncio.AbstractEventLoop
    outbox: Outbox
    events: asyncio.Queue[Event | LocalvlError] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # scheduled at least once (no longer counts against max_queue)
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    generator: torch.Generator | None = None
    prompt_ids: torch.Tensor | None = None  # distinct prompt ids, for the repetition penalty
    logprobs: int | None = None  # alternatives per token, when log-probabilities were asked for
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens whose text is held back
    parser: OutputParser | None = None  # splits thinking and tool calls out of the text
    matcher: Any = None  # llguidance.LLMatcher when the output is constrained by a grammar
    banned: tuple[int, ...] = ()  # tokens never sampled (the tool-call tag under tool_choice none)
    thinking_budget: int | None = None  # thinking tokens left before the end of thinking is forced
    thinking_tokens: int = 0
    forced: list[int] = field(default_factory=list)  # tokens emitted next whatever the logits say
    one_tool_call: bool = False  # parallel tool calls were not allowed: the turn ends after the first
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def emit(self, item: Event | LocalvlError) -> None:
        self.outbox.add(self, item)


class Stream:
    """The asyncio end of one request (a ``GenerationStream``)."""

    def __init__(self, seq: Sequence, abort: Callable[[str], None]) -> None:
        self.request_id = seq.id
        self.input_tokens = len(seq.prompt)
        self._job: Job = seq.payload
        self._abort = abort
        self._done = False
        self._held: Event | LocalvlError | None = None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self._job.events.get()
        if isinstance(item, TextDelta):
            # A consumer that fell behind gets what queued up as one delta, not one per token.
            events = self._job.events
            deltas = [item]
            while not events.empty():
                following = events.get_nowait()
                if not isinstance(following, TextDelta):
                    self._held = following
                    break
                deltas.append(following)
            if len(deltas) > 1:
                item = TextDelta("".join(d.text for d in deltas), tuple(lp for d in deltas for lp in d.logprobs))
        if isinstance(item, LocalvlError):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self.request_id)
