"""Engine v1: the model in this process, one request at a time, on its own thread.

The asyncio side renders and validates a request (in a worker thread, so the event loop stays
free), then hands it to the engine thread and drains its events from an asyncio queue. The
engine thread prefills in chunks (bounded memory for 30k-token prompts) and decodes token by
token, checking between steps whether the client has gone.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

from localvl.conversation import Conversation, GenerationRequest, SamplingParams
from localvl.engine.detokenizer import IncrementalDetokenizer, special_token_ids
from localvl.engine.events import Event, FinishReason, Finished, TextDelta, Usage
from localvl.engine.protocol import ModelInfo
from localvl.engine.qwen_vl import PromptInputs, QwenVLRunner
from localvl.engine.sampling import ResolvedSampling, sample_next
from localvl.engine.stops import StopMatcher
from localvl.errors import InternalError, InvalidRequestError, LocalvlError, ServiceUnavailableError
from localvl.models.loader import LoadedModel
from localvl.prompt.render import Renderer

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    request_id: str
    prompt: PromptInputs
    max_new_tokens: int
    context_limited: bool  # max_new_tokens was cut to what the context has left
    sampling: ResolvedSampling
    stop_sequences: tuple[str, ...]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event | LocalvlError] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Event | LocalvlError) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()


class _Stream:
    """The asyncio end of one job."""

    def __init__(self, job: _Job, engine: LocalEngine) -> None:
        self.request_id = job.request_id
        self.input_tokens = int(job.prompt.input_ids.numel())
        self._job = job
        self._engine = engine
        self._done = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        item = await self._job.events.get()
        if isinstance(item, LocalvlError):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)


class LocalEngine:
    def __init__(self, loaded: LoadedModel, *, prefill_chunk_tokens: int = 2048) -> None:
        self.loaded = loaded
        self.runner = QwenVLRunner(loaded.model)
        self.renderer = Renderer(loaded.processor)
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        # The engine thread decodes with its own copy: one Rust tokenizer must not serve two threads.
        self._tokenizer = copy.deepcopy(loaded.tokenizer)
        self._skip_ids = special_token_ids(self._tokenizer) - loaded.eos_token_ids
        self._vocab_limit = len(self._tokenizer)  # ids past the tokenizer are embedding padding
        self._info = ModelInfo(loaded.name_or_path, loaded.model_type, loaded.context_length)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._active: dict[str, _Job] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="localvl-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        for job in list(self._active.values()):
            job.cancelled.set()
        if self._thread is not None:
            self._jobs.put(None)
            await anyio.to_thread.run_sync(self._thread.join)
            self._thread = None

    async def count_tokens(self, conversation: Conversation) -> int:
        return await anyio.to_thread.run_sync(self.renderer.count, conversation)

    async def submit(self, request: GenerationRequest) -> _Stream:
        if self._stopping or self._thread is None:
            raise ServiceUnavailableError("the engine is not running")
        prompt = await anyio.to_thread.run_sync(self.renderer.render, request.conversation)
        length = int(prompt.input_ids.numel())
        limit = self._info.context_length
        if length > limit:
            raise InvalidRequestError(f"prompt is too long: {length} tokens > {limit} maximum")
        room = limit - length
        sampling = request.sampling
        job = _Job(
            request_id=request.id,
            prompt=prompt,
            max_new_tokens=min(sampling.max_tokens, room),
            context_limited=sampling.max_tokens > room,
            sampling=self._resolve(sampling),
            stop_sequences=tuple(sampling.stop_sequences),
            seed=sampling.seed,
            loop=asyncio.get_running_loop(),
        )
        self._active[job.request_id] = job
        self._jobs.put(job)
        return _Stream(job, self)

    def abort(self, request_id: str) -> None:
        job = self._active.get(request_id)
        if job is not None:
            job.cancelled.set()

    def _resolve(self, sampling: SamplingParams) -> ResolvedSampling:
        defaults = self.loaded.sampling_defaults
        return ResolvedSampling(
            temperature=defaults.temperature if sampling.temperature is None else sampling.temperature,
            top_p=defaults.top_p if sampling.top_p is None else sampling.top_p,
            top_k=defaults.top_k if sampling.top_k is None else sampling.top_k,
        )

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
                if job.cancelled.is_set():
                    logger.debug("%s aborted", job.request_id)
            except Exception as error:  # the message names no request content: only the failure
                logger.error("generation failed for %s: %s", job.request_id, type(error).__name__)
                logger.debug("generation failure", exc_info=True)
                job.emit(InternalError("the engine failed while generating this response"))
            finally:
                self._active.pop(job.request_id, None)

    @torch.inference_mode()
    def _generate(self, job: _Job) -> None:
        runner = self.runner
        prompt = runner.embed_prompt(job.prompt)
        cache = runner.new_cache()
        length = len(prompt)
        hidden: torch.Tensor | None = None
        for start in range(0, length, self.prefill_chunk_tokens):
            if job.cancelled.is_set():
                return
            hidden = runner.prefill(prompt, cache, start, min(length, start + self.prefill_chunk_tokens))
        assert hidden is not None  # a rendered prompt is never empty

        detokenizer = IncrementalDetokenizer(self._tokenizer, self._skip_ids)
        stops = StopMatcher(job.stop_sequences)
        generator = None
        if job.seed is not None:
            generator = torch.Generator(device=runner.device).manual_seed(job.seed)
        produced = 0
        reason: FinishReason
        while True:
            if produced >= job.max_new_tokens:
                reason = "context_window" if job.context_limited else "max_tokens"
                break
            logits = runner.logits(hidden)
            logits[self._vocab_limit :] = float("-inf")
            token = sample_next(logits, job.sampling, generator)
            produced += 1
            if token in self.loaded.eos_token_ids:
                reason = "eos"
                break
            text = stops.feed(detokenizer.add(token))
            if text:
                job.emit(TextDelta(text))
            if stops.matched is not None:
                reason = "stop_sequence"
                break
            if job.cancelled.is_set():
                return
            hidden = runner.decode(token, length + produced - 1, prompt.delta, cache)
        if stops.matched is None:
            tail = stops.feed(detokenizer.flush())
            tail += stops.flush()
            if tail:
                job.emit(TextDelta(tail))
            if stops.matched is not None:
                reason = "stop_sequence"
        job.emit(Finished(reason, Usage(input_tokens=length, output_tokens=produced), stops.matched))
