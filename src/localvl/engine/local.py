"""The in-process engine: continuous batching of many requests over one model, on its own thread.

The asyncio side renders and validates a request (in a worker thread, so the event loop stays
free), then hands it to the engine thread and drains its events from an asyncio queue. The engine
thread loops: take in new and cancelled requests → schedule a step (``scheduler.py``) → run it
(``runner.py``) → sample, detokenize, match stop sequences and emit events → repeat.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import anyio
import torch

from localvl.conversation import Conversation, GenerationRequest
from localvl.engine.blocks import BlockManager
from localvl.engine.constraints import Constraints, allowed_tokens
from localvl.engine.bridge import Job, Outbox, Stream
from localvl.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from localvl.engine.vision_graphs import VisionGraphs
from localvl.engine.detokenizer import IncrementalDetokenizer, special_token_ids, token_bytes
from localvl.engine.events import (
    FinishReason,
    Finished,
    RequestRecord,
    TextDelta,
    ThinkingDelta,
    TokenLogprob,
    ToolCallEvent,
    Usage,
)
from localvl.engine.frontend import Admission, Frontend, ModelFacts
from localvl.engine.kv_cache import PagedKVCache
from localvl.engine.linear_attention import LinearStates
from localvl.engine.protocol import ModelInfo
from localvl.engine.qwen_vl import QwenVLRunner
from localvl.engine.runner import StepRunner
from localvl.engine.sampling import GREEDY, apply_penalties, generator_seed, sample_batch, sample_next
from localvl.engine.scheduler import Scheduled, Scheduler
from localvl.engine.sequence import Sequence
from localvl.engine.stops import StopMatcher
from localvl.engine.vision import ImageCache
from localvl.errors import InternalError, InvalidRequestError, OverloadedError, ServiceUnavailableError
from localvl.models.loader import LoadedModel
from localvl.prompt.outputs import THINK_CLOSE, THINK_OPEN, TOOL_OPEN, Piece, TextPiece, ThinkingPiece, tool_call_id
from localvl.prompt.render import Renderer

logger = logging.getLogger(__name__)

GiB = 1 << 30
IDLE_REPORT = 1.0  # seconds between the idle engine thread's flushes (an engine process's heartbeat)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int | None = None  # tokens per step: decodes plus prefill chunks; None: by device (below)
    max_num_seqs: int = 64  # sequences in the running batch
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: 2 GiB on a CPU, a share of free memory on a GPU
    gpu_memory_utilization: float = 0.85
    image_cache_memory: int = 512 << 20
    state_cache_memory: int = 1 << 30  # hybrid decoders: snapshots of linear-attention state to resume prefixes from
    max_queue: int = 256  # waiting requests beyond this get 529 overloaded_error
    cuda_graphs: bool = True  # replay decode steps, lone prefill chunks and vision-tower calls as CUDA graphs (GPU only)
    cpu_kernel: bool = True  # decode attention by cpu_decode.py's compiled kernel (CPU only)
    compile: bool = False  # the text decoder through torch.compile (``QwenVLRunner``), compiled at start
    check_integrity: bool = False  # audit the block tables whenever the engine goes idle (tests)
    stream_interval: float = 0.0  # seconds between a stream's text deltas (``bridge.Stream``)


def default_batch_tokens(device: torch.device) -> int:
    """A step's token budget when none is set. A CPU gets half a GPU's: a 3B model's 2,048-token
    chunk there paused running streams 19.2 s (four of its layers, one core), a 1,024-token one
    10.4 s, for a prefill 1-2 % slower (docs/PERFORMANCE.md, ninth session)."""
    return 2048 if device.type == "cuda" else 1024


class LocalEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, outbox: Outbox | None = None) -> None:
        self.loaded = loaded
        self.config = config = config or EngineConfig()
        self.model = QwenVLRunner(loaded.model, compile=config.compile)
        # The engine thread decodes with its own copy: one Rust tokenizer must not serve two threads.
        self._tokenizer = copy.deepcopy(loaded.tokenizer)
        self._skip_ids = special_token_ids(self._tokenizer) - loaded.eos_token_ids
        self._vocab_limit = len(self._tokenizer)  # ids past the tokenizer are embedding padding
        vocab_size = int(self.model.text_config.vocab_size)
        self.constraints = Constraints(loaded.tokenizer, vocab_size, loaded.eos_token_ids)
        self._think_close_ids = self._tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
        # Of those, the ones still counted as thinking (up to </think>): forced early enough, the
        # thinking, its closing tag included, stays within the budget.
        close = self._tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        self._think_close_cost = self._think_close_ids.index(close) + 1 if close in self._think_close_ids else 0
        # Tokens that open reasoning or a tool call: markup, not the answer's content.
        self._opening_ids = {ids[0] for ids in (self._tokenizer.encode(t, add_special_tokens=False) for t in (TOOL_OPEN, THINK_OPEN)) if len(ids) == 1}
        self.linear_states = None
        if self.model.hybrid:  # one state slot per sequence the batch can hold, and snapshots to resume from
            self.linear_states = LinearStates(
                self.model.linear, config.max_num_seqs, self.model.dtype, self.model.device, config.state_cache_memory
            )
            logger.info("linear-attention state: %d slots (%.2f GiB)", config.max_num_seqs, self.linear_states.nbytes / GiB)
        self.kv_cache = self._make_kv_cache()
        # A hybrid decoder resumes a cached prefix only where a state snapshot was kept (linear_attention.py).
        resumable = self.linear_states.resumable if self.linear_states is not None else None
        self.blocks = BlockManager(self.kv_cache.num_blocks, config.block_size, resumable=resumable)
        budget = config.max_batch_tokens or default_batch_tokens(self.model.device)
        self.scheduler = Scheduler(self.blocks, max_batch_tokens=budget, max_num_seqs=config.max_num_seqs)
        self.image_cache = ImageCache(config.image_cache_memory)
        graphs = None
        if config.cuda_graphs and self.model.device.type == "cuda":
            max_blocks = -(-loaded.context_length // config.block_size)
            graphs = DecodeGraphs(
                self.model, self.kv_cache, config.max_num_seqs, min(max_blocks, self.kv_cache.num_blocks), self.linear_states
            )
        vision_graphs = prefill_graphs = None
        if config.cuda_graphs and self.model.device.type == "cuda":
            vision_graphs = VisionGraphs(self.model)
            # A padded prefill would run its padding through a hybrid's linear layers, into its state.
            prefill_graphs = None if self.model.hybrid else PrefillGraphs(self.model, self.kv_cache, budget)
        self.runner = StepRunner(
            self.model, self.kv_cache, self.image_cache, graphs, vision_graphs, prefill_graphs, self.linear_states
        )
        self.runner.system_turn = tuple(self._tokenizer.encode("<|im_start|>system", add_special_tokens=False))
        text = self.model.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (config.block_size, text.num_attention_heads, text.num_key_value_heads, head_dim)
        if self.model.device.type == "cpu" and config.cpu_kernel:
            from localvl.engine import cpu_decode

            self.runner.decode_kernel = cpu_decode.usable(self.model.dtype, *shape)
        if config.compile:
            started = time.perf_counter()
            self.model.warm_up(self.kv_cache)
            if self.model.compiled:
                logger.info("compiled the text decoder in %.1f s", time.perf_counter() - started)
        if self.model.device.type == "cuda":
            from localvl.engine import triton_decode

            kernel = triton_decode.usable(self.model.device, self.model.dtype, *shape)
            self.runner.decode_kernel = kernel
            if graphs is not None:
                graphs.kernel = kernel
                started = time.perf_counter()
                if captured := graphs.capture_all():
                    logger.info("captured %d decode graphs in %.1f s", captured, time.perf_counter() - started)
        # A sequence can never outgrow the pool, whatever the model's context says.
        capacity = self.kv_cache.num_blocks * config.block_size
        self.observers: list[Callable[[RequestRecord], None]] = []  # called on the engine thread
        self._info = ModelInfo(loaded.name_or_path, loaded.model_type, min(loaded.context_length, capacity))
        self.facts = ModelFacts(
            self.model.image_token_id, self.model.spatial_merge_size, loaded.sampling_defaults, self._info.context_length
        )
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._outbox = outbox or Outbox()  # another kind in an engine process (process.py)
        self._active: dict[str, Sequence] = {}
        # Requests submitted and not yet started: each counter is written by one thread only.
        self._submitted = 0  # asyncio side
        self._started = 0  # engine thread: first scheduled, or dropped before that
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.failures = 0
        self.integrity_failures = 0

    def _make_kv_cache(self) -> PagedKVCache:
        text = self.model.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        attention_layers = self.model.attention_layers
        shape = dict(
            num_layers=len(attention_layers), block_size=self.config.block_size,
            kv_heads=text.num_key_value_heads, head_dim=head_dim, dtype=self.model.dtype,
        )
        per_block = PagedKVCache.bytes_per_block(**shape)  # type: ignore[arg-type]
        budget = self.config.kv_cache_memory
        device = self.model.device
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * self.config.gpu_memory_utilization)
                if self.linear_states is not None:  # a hybrid's state snapshots live beside the pool
                    budget = max(per_block, budget - self.linear_states.snapshot_memory)
            else:
                budget = 2 * GiB
        # More blocks than every running sequence at full context could use would be wasted.
        useful = self.config.max_num_seqs * -(-self.loaded.context_length // self.config.block_size)
        num_blocks = max(1, min(budget // per_block, useful))
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.config.block_size, num_blocks * per_block / GiB)
        shape["num_layers"] = text.num_hidden_layers
        return PagedKVCache(num_blocks=num_blocks, device=device, attention_layers=attention_layers, **shape)  # type: ignore[arg-type]

    @functools.cached_property
    def frontend(self) -> Frontend:
        """Made on first use: in an engine process (process.py) the server renders, not this."""
        return Frontend(self.loaded.processor, self.facts)

    @property
    def renderer(self) -> Renderer:
        return self.frontend.renderer

    @property
    def info(self) -> ModelInfo:
        return self._info

    def stats(self) -> dict[str, int]:
        """Counters for tests, benchmarks and metrics (read from any thread; approximate while running)."""
        return {
            "steps": self.steps,
            "running": len(self.scheduler.running),
            "waiting": self._submitted - self._started,
            "blocks_used": self.blocks.used_blocks,
            "blocks_total": self.blocks.num_blocks,
            "preemptions": self.scheduler.preemptions,
            "images_encoded": self.runner.images_encoded,
            "image_cache_hits": self.image_cache.hits,
            "states_restored": self.linear_states.restored if self.linear_states is not None else 0,
            "graph_replays": self.runner.graphs.replays if self.runner.graphs else 0,
            "vision_graph_replays": self.runner.vision_graphs.replays if self.runner.vision_graphs else 0,
            "prefill_graph_replays": self.runner.prefill_graphs.replays if self.runner.prefill_graphs else 0,
            "decode_kernel": int(self.runner.decode_kernel),
            "compiled": int(self.model.compiled),
            "failures": self.failures,
            "integrity_failures": self.integrity_failures,
        }

    @property
    def alive(self) -> bool:
        """The engine thread is running (it stops only when asked to, or if it dies)."""
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        self.start_thread()

    async def stop(self) -> None:
        await anyio.to_thread.run_sync(self.stop_thread)

    def start_thread(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="localvl-engine", daemon=True)
            self._thread.start()

    def stop_thread(self) -> None:
        """Drop every request (their streams end with 503) and wait for the engine thread to end."""
        self._stopping = True
        for seq in list(self._active.values()):
            seq.payload.cancelled.set()
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    async def count_tokens(self, conversation: Conversation) -> int:
        return await self.frontend.count_tokens(conversation)

    async def submit(self, request: GenerationRequest) -> Stream:
        if self._stopping or self._thread is None:
            raise ServiceUnavailableError("the engine is not running")
        if not request.queue_checked:
            self._check_queue()
        admission = await self.frontend.prepare(request)
        matcher = None
        if admission.grammar is not None:
            matcher = await anyio.to_thread.run_sync(self.constraints.matcher, admission.grammar)
        loop = asyncio.get_running_loop()
        job = self.admit(admission, matcher, self._outbox, loop)
        return Stream(admission.id, len(admission.ids), job.events, self.abort, self.config.stream_interval)

    def admit(self, admission: Admission, matcher: Any, outbox: Outbox, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a prepared request for the engine thread (from any one thread at a time)."""
        if not self.alive:  # a request queued for a thread that has ended would wait forever
            raise ServiceUnavailableError("the engine is not running")
        if not admission.queue_checked:
            self._check_queue()  # again: others may have queued while this one rendered
        job = self._job(admission, matcher, outbox, loop)
        seq = Sequence(
            admission.id, admission.ids, admission.images, max_new_tokens=admission.max_new_tokens,
            priority=admission.priority, payload=job,
        )
        self._active[seq.id] = seq
        self._submitted += 1
        self._inbox.put(seq)
        return job

    def _job(self, admission: Admission, matcher: Any, outbox: Outbox, loop: asyncio.AbstractEventLoop | None) -> Job:
        return Job(
            id=admission.id,
            prompt=admission.prompt,
            sampling=admission.sampling,
            stop_sequences=admission.stop_sequences,
            seed=admission.seed,
            logprobs=admission.logprobs,
            context_limited=admission.context_limited,
            loop=loop,
            outbox=outbox,
            parser=admission.parser,
            thinking_budget=admission.thinking_budget,
            one_tool_call=admission.one_tool_call,
            matcher=matcher,
            banned=admission.banned,
            bias=admission.bias,
        )

    def _check_queue(self) -> None:
        if self._submitted - self._started >= self.config.max_queue:
            raise OverloadedError("the server is overloaded; retry shortly", headers={"retry-after": "1"})

    def abort(self, request_id: str) -> None:
        seq = self._active.get(request_id)
        if seq is not None:
            seq.payload.cancelled.set()  # the engine drops it before its next step

    # ------------------------------------------------------------------ the engine thread

    @torch.inference_mode()
    def _run(self) -> None:
        audited = False  # since the engine last went idle
        while True:
            block = len(self.scheduler) == 0
            if block and not audited and self.config.check_integrity:
                self._audit()
            audited = block
            try:
                while True:
                    # Idle, it still wakes now and then to flush: an engine process's outbox sends
                    # its counters then, the sign of life that tells an idle engine from a hung one.
                    seq = self._inbox.get(block=block, timeout=IDLE_REPORT)
                    block = audited = False
                    if seq is None:
                        if self._stopping:
                            self._shutdown()
                            self._outbox.flush()
                            return
                        continue
                    try:
                        self._admit(seq)
                    except Exception as error:  # a bug guard: this request fails, the engine goes on
                        logger.error("admitting a request failed: %s", type(error).__name__)
                        logger.debug("admission failure", exc_info=True)
                        seq.payload.emit(InternalError("the engine could not take this request"))
                        self._finish(seq)
            except queue.Empty:
                pass
            try:
                self._drop_cancelled()
                if len(self.scheduler):
                    self._step()
            except Exception as error:  # a bug outside a step's own guard: fail what is in flight, go on
                self.failures += 1
                logger.error("engine loop failed: %s", type(error).__name__)
                logger.debug("engine loop failure", exc_info=True)
                for seq in self.scheduler.sequences():
                    seq.payload.emit(InternalError("the engine failed while generating this response"))
                    self._finish(seq)
            self._outbox.flush()

    def _audit(self) -> None:
        try:
            self.scheduler.check()
            if self.blocks.used_blocks:
                raise AssertionError(f"{self.blocks.used_blocks} blocks in use with no sequence left")
        except AssertionError as error:
            self.integrity_failures += 1
            logger.error("KV-cache integrity check failed: %s", error)

    def _admit(self, seq: Sequence) -> None:
        job: Job = seq.payload
        job.detokenizer = IncrementalDetokenizer(self._tokenizer, self._skip_ids)
        job.stops = StopMatcher(job.stop_sequences)
        if job.seed is not None:
            job.generator = torch.Generator(device=self.model.device).manual_seed(generator_seed(job.seed))
        self.scheduler.add(seq)

    def _drop_cancelled(self) -> None:
        for seq in self.scheduler.sequences():
            if seq.payload.cancelled.is_set():
                self._finish(seq)
                logger.debug("%s aborted", seq.id)

    def _mark_started(self, seq: Sequence) -> None:
        job: Job = seq.payload
        if not job.started:
            job.started = True
            self._started += 1

    def _finish(self, seq: Sequence) -> None:
        self._mark_started(seq)
        self.scheduler.remove(seq)
        self._active.pop(seq.id, None)

    def _shutdown(self) -> None:
        for seq in self.scheduler.sequences():
            seq.payload.emit(ServiceUnavailableError("the server is shutting down"))
            self._finish(seq)

    def _step(self) -> None:
        try:
            batch = self.scheduler.schedule()
        except MemoryError:  # a bug guard: submit keeps every sequence within the pool
            logger.exception("scheduling failed")
            for seq in self.scheduler.waiting:
                seq.payload.emit(InternalError("the engine could not schedule this request"))
                self._finish(seq)
            return
        for s in batch:
            self._mark_started(s.sequence)
        if not batch:
            return
        self.steps += 1
        try:
            self._run_batch(batch)
        except Exception as error:  # the message names no request content: only the failure
            self.failures += 1
            logger.error("engine step failed: %s", type(error).__name__)
            logger.debug("engine step failure", exc_info=True)
            for s in batch:
                if s.sequence.id in self._active:
                    s.sequence.payload.emit(InternalError("the engine failed while generating this response"))
                    self._finish(s.sequence)

    def _run_batch(self, batch: list[Scheduled]) -> None:
        samplers, logits = self.runner.run(batch)
        size = self.blocks.block_size
        for s in batch:
            seq = s.sequence
            seq.num_computed += s.count
            if seq.num_computed // size > seq.table.hashed:  # a block filled up: publish it
                settled = seq.cache_settled_blocks
                created = self.blocks.register(seq.table, seq.tokens, seq.images, seq.num_computed, len(seq.prompt), settled=settled)
                seq.cache_settled_blocks = max(settled, seq.table.hashed)
                if self.linear_states is None:  # a hybrid's prefix is cached where its state is (runner.py)
                    seq.cache_created_tokens += created
        if logits is not None:
            self._sample(samplers, logits)

    def _sample(self, samplers: list[Scheduled], logits: torch.Tensor) -> None:
        logits[:, self._vocab_limit :] = float("-inf")
        wanted = [row for row, s in enumerate(samplers) if s.sequence.payload.logprobs is not None]
        # log-probabilities of the model itself: before penalties and temperature
        model_logprobs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
        logprob_row = {row: i for i, row in enumerate(wanted)}
        self._penalise(logits, samplers)
        # Biases, then bans (a bias never lifts a banned token): one indexed write each for the batch.
        biased = [(row, token, value) for row, s in enumerate(samplers) for token, value in s.sequence.payload.bias]
        if biased:
            rows, ids, values = zip(*biased)
            logits.index_put_(
                (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)),
                torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True,
            )
        banned = [(row, token) for row, s in enumerate(samplers) for token in s.sequence.payload.banned]
        if banned:
            rows, ids = zip(*banned)
            logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = float("-inf")
        constrained = [row for row, s in enumerate(samplers) if s.sequence.payload.matcher is not None]
        if constrained:
            allowed = allowed_tokens([samplers[row].sequence.payload.matcher for row in constrained], logits.shape[1],
                                     logits.device)
            index = torch.tensor(constrained, device=logits.device)
            logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
            # A row with no token left (a schema no finite output satisfies, or one that allows only
            # banned tokens) is the request's fault; its logits are reset so the batch samples safely.
            dead = [constrained[i] for i in (~torch.isfinite(logits[index]).any(dim=1)).nonzero().flatten().tolist()]
            for row in dead:
                logits[row] = 0.0
        else:
            dead = []
        # Seeded requests draw from their own generators, row by row (an argmax stands in for them in
        # the batch); the rest in one batch.
        batched = [GREEDY if s.sequence.payload.generator is not None else s.sequence.payload.sampling for s in samplers]
        tokens = sample_batch(logits, batched)
        for row, s in enumerate(samplers):
            job: Job = s.sequence.payload
            if row in dead:
                job.emit(InvalidRequestError("the output's constraints (tool input schema, output format or tool_choice) "
                                             "admit no output this model can produce"))
                self._finish(s.sequence)
                continue
            if job.generator is not None and not job.sampling.greedy:
                tokens[row] = sample_next(logits[row], job.sampling, job.generator)
            if job.forced:  # e.g. the end of thinking, once its budget is spent
                tokens[row] = job.forced.pop(0)
            if job.matcher is not None and not job.matcher.consume_token(tokens[row]):
                if job.matcher.is_error():
                    # The parser gave up on the client's grammar (a limit on its size was hit: say, a
                    # self-referencing schema). Its message may quote output, so it stays out.
                    logger.warning("constrained decoding stopped: the request's grammar hit a parser limit")
                    job.emit(InvalidRequestError("the output's constraints (tool input schema or output format) are too "
                                                 "complex for constrained decoding; simplify the schema"))
                else:
                    logger.error("constrained decoding failed: the sampled token was outside the grammar")
                    job.emit(InternalError("the engine failed to keep the output to its grammar"))
                self._finish(s.sequence)
                continue
            entry = None
            if model_logprobs is not None and row in logprob_row:
                entry = self._logprob_entry(job, model_logprobs[logprob_row[row]], tokens[row])
            self._append(s.sequence, tokens[row], entry)

    def _token_text(self, token: int) -> tuple[str, tuple[int, ...]]:
        return self._tokenizer.decode([token]), tuple(token_bytes(self._tokenizer, token))

    def _logprob_entry(self, job: Job, logprobs: torch.Tensor, token: int) -> TokenLogprob | None:
        if token in self.loaded.eos_token_ids:
            return None  # the end of the turn has no text: OpenAI lists no entry for it
        parser = job.parser
        if parser is not None and (parser.in_thinking or parser.in_tool_call or token in self._opening_ids):
            return None  # reasoning and tool-call markup: OpenAI's logprobs are the message content's
        top: list[tuple[str, float, tuple[int, ...]]] = []
        if job.logprobs:
            values, ids = torch.topk(logprobs, min(job.logprobs, logprobs.numel()))
            for alternative, value in zip(ids.tolist(), values.tolist()):
                alternative_text, alternative_bytes = self._token_text(alternative)
                top.append((alternative_text, value, alternative_bytes))
        text, raw = self._token_text(token)
        return TokenLogprob(text, float(logprobs[token]), raw, tuple(top))

    def _emit_text(self, job: Job, text: str) -> None:
        """Generated text, through the output parser (thinking, tool calls) when there is one. Stop
        sequences are matched on the answer's text only: a stop such as "\n" met in hidden
        reasoning or inside a tool call's markup must not end the turn before its answer."""
        assert job.stops is not None
        if job.parser is None:
            shown = job.stops.feed(text)
            if shown:
                job.emit(self._delta(job, shown))
        else:
            self._emit_pieces(job, job.parser.feed(text))

    def _emit_pieces(self, job: Job, pieces: list[Piece]) -> None:
        assert job.stops is not None
        for piece in pieces:
            if job.stops.matched is not None:
                return  # the turn ended at the stop: nothing after it is shown
            if isinstance(piece, TextPiece):
                shown = job.stops.feed(piece.text)
                if shown:
                    job.emit(self._delta(job, shown))
                continue
            held = job.stops.flush()  # text held as a stop's possible start ends here: it goes first
            if held:
                job.emit(self._delta(job, held))
            if job.stops.matched is not None:
                return
            if isinstance(piece, ThinkingPiece):
                job.emit(ThinkingDelta(piece.text))
            else:
                job.emit(ToolCallEvent(tool_call_id(), piece.name, piece.input, piece.partial))

    def _delta(self, job: Job, text: str) -> TextDelta:
        """A delta carrying the log-probabilities of the tokens whose text it begins to show. A
        token whose text is still held back (a stop sequence's possible start) waits: if the stop
        completes, the token was part of it and gets no entry, as its text gets no place."""
        assert job.stops is not None
        shown = job.stops.shown
        ready = tuple(entry for start, entry in job.pending_logprobs if start < shown)
        job.pending_logprobs[:] = [(start, entry) for start, entry in job.pending_logprobs if start >= shown]
        return TextDelta(text, ready)

    def _penalise(self, logits: torch.Tensor, samplers: list[Scheduled]) -> None:
        rows = [row for row, s in enumerate(samplers) if s.sequence.payload.sampling.penalised]
        if not rows:
            return
        jobs: list[Job] = [samplers[row].sequence.payload for row in rows]
        for row, job in zip(rows, jobs):
            if job.prompt_ids is None:  # once per request
                job.prompt_ids = torch.unique(torch.tensor(samplers[row].sequence.prompt, dtype=torch.long, device=logits.device))
        prompts = [job.prompt_ids for job in jobs]
        outputs = [samplers[row].sequence.outputs for row in rows]
        apply_penalties(logits, rows, [job.sampling for job in jobs], prompts, outputs)  # type: ignore[misc]

    def _append(self, seq: Sequence, token: int, entry: TokenLogprob | None = None) -> None:
        job: Job = seq.payload
        assert job.detokenizer is not None and job.stops is not None
        if job.cancelled.is_set():
            return  # dropped before the next step
        reason: FinishReason | None = None
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        if len(seq.outputs) >= seq.max_new_tokens:  # a prompt that filled the context exactly
            reason = "context_window" if job.context_limited else "max_tokens"
        elif token in self.loaded.eos_token_ids:
            seq.outputs.append(token)
            reason = "eos"
        else:
            seq.outputs.append(token)
            thinking = job.parser is not None and job.parser.in_thinking
            text = job.detokenizer.add(token)
            if entry is not None:
                # Where its own text starts in the answer: after what the answer holds so far and
                # after the earlier bytes of a character that this token's text completes.
                job.pending_logprobs.append((job.stops.fed + max(0, len(text) - len(entry.token)), entry))
            self._emit_text(job, text)
            job.thinking_tokens += thinking  # the token that closes the thinking too
            if job.thinking_budget is not None and job.parser is not None and job.parser.in_thinking:
                if job.thinking_tokens + self._think_close_cost >= job.thinking_budget and not job.forced:
                    job.forced = list(self._think_close_ids)
                    job.thinking_budget = None  # forced once
            if job.stops.matched is not None:
                reason = "stop_sequence"
            elif job.one_tool_call and job.parser is not None and job.parser.tool_calls:
                reason = "tool_use"  # one call at most was asked for: the turn ends with it
            elif len(seq.outputs) >= seq.max_new_tokens:
                reason = "context_window" if job.context_limited else "max_tokens"
        if reason is None:
            return
        if job.stops.matched is None:
            self._emit_text(job, job.detokenizer.flush())
            if job.parser is not None:
                self._emit_pieces(job, job.parser.finish(truncated=reason in ("max_tokens", "context_window")))
            tail = job.stops.flush()  # text held while it could have begun a stop
            if tail:
                job.emit(self._delta(job, tail))
            if job.stops.matched is not None:
                reason = "stop_sequence"
        if reason == "eos" and job.parser is not None and job.parser.tool_calls:
            reason = "tool_use"
        # Entries still pending: after a stop, the tokens of the stop sequence, which is not shown;
        # else tokens that showed no text (a character never finished), which still belong to it.
        if job.pending_logprobs and job.stops.matched is None:
            job.emit(TextDelta("", tuple(entry for _, entry in job.pending_logprobs)))
        job.pending_logprobs.clear()
        read, created = seq.cache_read_tokens, seq.cache_created_tokens
        usage = Usage(
            input_tokens=len(seq.prompt) - read - created,
            output_tokens=len(seq.outputs),
            cache_read_input_tokens=read,
            cache_creation_input_tokens=created,
            reasoning_tokens=job.thinking_tokens,
        )
        job.emit(Finished(reason, usage, job.stops.matched))
        self._finish(seq)
        if self.observers:
            now = time.monotonic()
            ttft = None if job.first_token_at is None else job.first_token_at - job.submitted_at
            record = RequestRecord(ttft, now - job.submitted_at, len(seq.outputs), len(seq.prompt), read, reason)
            for observe in self.observers:
                try:
                    observe(record)
                except Exception as error:  # metrics must never fail a request
                    logger.error("request observer failed: %s", type(error).__name__)
