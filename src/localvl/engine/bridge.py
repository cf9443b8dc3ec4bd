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
from localvl.engine.events import Event, Finished, TextDelta, ThinkingDelta, TokenLogprob, ToolCallEvent
from localvl.engine.runner import PromptState
from localvl.engine.sampling import ResolvedSampling
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

    id: str
    prompt: PromptState
    sampling: ResolvedSampling
    stop_sequences: tuple[str, ...]
    seed: int | None
    context_limited: bool  # max_new_tokens was cut to what the context has left
    loop: asyncio.AbstractEventLoop | None  # where the events go (None in an engine process: a pipe)
    outbox: Outbox
    events: asyncio.Queue[Event | LocalvlError] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # scheduled at least once (no longer counts against max_queue)
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    generator: torch.Generator | None = None
    prompt_ids: torch.Tensor | None = None  # distinct prompt ids, for the repetition penalty
    logprobs: int | None = None  # alternatives per token, when log-probabilities were asked for
    # (where its text starts in the answer, entry) of tokens whose text is held back
    pending_logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    parser: OutputParser | None = None  # splits thinking and tool calls out of the text
    matcher: Any = None  # llguidance.LLMatcher when the output is constrained by a grammar
    banned: tuple[int, ...] = ()  # tokens never sampled (the tool-call tag under tool_choice none)
    bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): OpenAI's logit_bias
    thinking_budget: int | None = None  # thinking tokens left before the end of thinking is forced
    thinking_tokens: int = 0
    forced: list[int] = field(default_factory=list)  # tokens emitted next whatever the logits say
    one_tool_call: bool = False  # parallel tool calls were not allowed: the turn ends after the first
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def emit(self, item: Event | LocalvlError) -> None:
        self.outbox.add(self, item)


class Stream:
    """The asyncio end of one request (a ``GenerationStream``).

    Text arrives a token at a time; handing each token to the client as its own event costs the
    server a trip through the HTTP stack per token (measured on a 2-core CPU at 16 concurrent
    requests: ~100 µs of the event loop's time per event, competing with the engine for the GIL).
    So after a delta, the next one waits until ``interval`` seconds have passed and carries every
    token that came meanwhile: the first text goes out at once, later text at most ``interval``
    late, and every event that is not text (a tool call, the end) at once, with the text before it.
    """

    def __init__(
        self,
        request_id: str,
        input_tokens: int,
        events: asyncio.Queue[Event | LocalvlError],
        abort: Callable[[str], None],
        interval: float = 0.0,
    ) -> None:
        self.request_id = request_id
        self.input_tokens = input_tokens
        self._events = events
        self._abort = abort
        self._interval = interval
        self._last_delta = float("-inf")  # loop time the last delta went out
        self._done = False
        self._held: Event | LocalvlError | None = None
        # Outputs the engine sent (one per token that showed text, about): what a request that
        # never finished is charged for, its Finished and usage never coming.
        self.generated = 0

    def _count(self, item: Event | LocalvlError) -> Event | LocalvlError:
        if isinstance(item, (TextDelta, ThinkingDelta, ToolCallEvent)):
            self.generated += max(1, len(item.logprobs)) if isinstance(item, TextDelta) else 1
        return item

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = self._count(await self._events.get())
        if isinstance(item, (TextDelta, ThinkingDelta)):
            item = await self._gather(item)
        if isinstance(item, LocalvlError):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    async def _gather(self, item: TextDelta | ThinkingDelta) -> TextDelta | ThinkingDelta:
        """``item`` joined with the deltas of its kind that follow it, once the interval is over —
        or at once when another kind of event is already there (the end, most often: the last
        token's text and the end come in one step, and the end waits for nothing)."""
        loop = asyncio.get_running_loop()
        deltas = [item]
        self._take(deltas)
        wait = self._last_delta + self._interval - loop.time()
        if self._held is None and wait > 0:
            await asyncio.sleep(wait)
            self._take(deltas)
        self._last_delta = loop.time()
        if len(deltas) == 1:
            return item
        text = "".join(d.text for d in deltas)
        if isinstance(item, ThinkingDelta):
            return ThinkingDelta(text)
        return TextDelta(text, tuple(lp for d in deltas for lp in d.logprobs))  # type: ignore[union-attr]

    def _take(self, deltas: list[TextDelta | ThinkingDelta]) -> None:
        """Move the queued deltas of ``deltas``' kind onto it, up to the first other event, held."""
        events = self._events
        while not events.empty():
            following = self._count(events.get_nowait())
            if type(following) is not type(deltas[0]):
                self._held = following
                return
            deltas.append(following)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self.request_id)
            while not self._events.empty():  # made, if never read
                self._count(self._events.get_nowait())
