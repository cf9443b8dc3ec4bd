"""A seeded fuzzer for the engine under adversarial scheduling, and the invariants it checks.

Each case draws an engine configuration (tiny pools that force preemption, small blocks, small
step budgets that chunk prefills, few batch slots, a hybrid's snapshot memory, the prefix cache
on or off) and a workload (shared prefixes, repeated images, 0-3 images of different sizes,
different max_tokens, stop sequences, seeds and priorities, arrivals at random steps, and
cancellations at random steps, some in the middle of a step). The engine is driven step by step
on this thread (no engine thread: the schedule is the seed's alone), and checked:

* after every step: the block tables agree with the allocator (ref counts, free list, hash index),
  the queue counters with the scheduler, and nothing failed;
* at the end: every request not cancelled finished exactly once; no block, linear-state slot or
  queue place is left held; each usage splits its prompt exactly once (input + cache read +
  cache creation) and counts the tokens generated;
* greedy requests equal the model's own ``generate`` token for token (their text cut at a stop
  sequence when one matched); seeded sampled requests equal the same request run alone.

``python -m tests.engine.fuzz --family qwen3_5 --seeds 0:200`` runs many cases locally; the
test module runs a handful per family in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
from localvl.engine.blocks import block_hashes
from localvl.engine.bridge import Job, Outbox
from localvl.engine.events import Finished, TextDelta
from localvl.engine.kv_cache import PagedKVCache
from localvl.engine.local import EngineConfig, LocalEngine
from localvl.engine.sequence import BACKGROUND, INTERACTIVE, Sequence
from localvl.media.images import load_image
from localvl.prompt.render import Renderer
from tests.engine.reference import reference_tokens
from tests.helpers import image_bytes

MAX_TOKENS = 40  # the most any request asks for: one reference run per prompt covers every request
IMAGE_SIZES = ((60, 40), (90, 60), (40, 100), (128, 72))
SYSTEMS = ("", "You are terse. " * 3, "Answer in French, with care, and never at length. " * 2)


class Recorder(Outbox):
    """The events of every job, kept in order (no event loop: the fuzzer reads them directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[str, list[Any]] = {}

    def add(self, job: Job, item: Any) -> None:
        self.events.setdefault(job.id, []).append(item)

    def flush(self) -> None:
        pass


@dataclass
class Plan:
    """One request of a case: what it asks and when it arrives (and is cancelled)."""

    id: str
    conversation: Conversation
    key: tuple  # what the prompt is made of: equal keys, equal prompts
    max_tokens: int
    priority: int
    arrive: int  # the step before which it is submitted
    temperature: float = 0.0
    seed: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    stops: tuple[str, ...] = ()
    stop_pick: float | None = None  # where in the expected text a stop sequence is cut from
    cancel_at: int | None = None  # the step before which it is cancelled
    cancel_mid_step: bool = False  # ... or during that step, between the forward pass and sampling
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def request(self) -> GenerationRequest:
        sampling = SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            stop_sequences=self.stops, seed=self.seed, repetition_penalty=self.repetition_penalty, logprobs=self.logprobs,
        )
        return GenerationRequest(self.id, self.conversation, sampling, priority=self.priority)


@dataclass
class Case:
    family: str
    seed: int
    config: dict[str, Any]
    num_blocks: int
    prefix_cache: bool
    plans: list[Plan]
    graphs: bool = False  # the CUDA-graph paths (padded, static buffers), run eagerly off a GPU


    def describe(self) -> str:
        return (f"{self.family} seed={self.seed} blocks={self.num_blocks} prefix_cache={self.prefix_cache} "
                f"graphs={self.graphs} config={self.config} requests={len(self.plans)}")


@dataclass
class Result:
    case: Case
    checks: dict[str, int] = field(default_factory=dict)
    coverage: dict[str, int] = field(default_factory=dict)  # what the case exercised
    steps: int = 0
    preemptions: int = 0
    cancelled: int = 0

    def count(self, name: str, n: int = 1) -> None:
        self.checks[name] = self.checks.get(name, 0) + n


_images: dict[tuple[int, tuple[int, int]], Any] = {}


def picture(index: int, size: tuple[int, int]) -> Any:
    key = (index, size)
    if key not in _images:
        data = image_bytes("PNG", size=size, color=(index * 53 % 256, 90 + index * 17 % 100, 200))
        _images[key] = load_image(data, "image/png", f"fuzz{index}-{size[0]}x{size[1]}")
    return _images[key]


def draw_conversation(rng: random.Random, short: bool) -> tuple[Conversation, tuple]:
    """A prompt from small pools, so prefixes and images repeat across a case's requests.
    ``short``: a few words, no image (answers then outgrow their prompts: preemption)."""
    if short:
        text = " ".join(rng.choice(("hi", "why", "7", "über")) for _ in range(rng.randrange(1, 4)))
        return Conversation([Turn("user", [Text(text)])], thinking=False), ("", (text,))
    system = rng.choice(SYSTEMS)
    turns_key: list = [system]
    turns = [Turn("system", [Text(system)])] if system else []
    for turn in range(rng.choice((1, 1, 1, 2))):
        parts: list = []
        key: list = []
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            index, size = rng.randrange(4), rng.choice(IMAGE_SIZES)
            parts.append(picture(index, size))
            key.append(("image", index, size))
        words = " ".join(rng.choice(("cat", "boat", "why", "the red one", "count them", "7", "über")) for _ in range(rng.randrange(1, 12)))
        text = f"q{rng.randrange(3)} {words}"
        parts.insert(rng.randrange(len(parts) + 1), Text(text))
        key.append(text)
        turns.append(Turn("user", parts))
        turns_key.append(tuple(key))
        if turn == 0 and len(turns_key) and rng.random() < 0.5:
            break
    if len(turns) > 1 and turns[-1].role == "user" and sum(t.role == "user" for t in turns) == 2:
        # a next turn: the first user turn, an answer, a follow-up (its prefix is the first turn's)
        first = [t for t in turns if t.role == "user"][0]
        rest = [t for t in turns if t.role == "system"]
        turns = [*rest, first, Turn("assistant", [Text("it is a boat")]), turns[-1]]
    return Conversation(turns, thinking=False), tuple(turns_key)


def draw_case(family: str, seed: int, per_token: int) -> Case:
    """A case from its seed alone (``per_token``: the pool's bytes per token, from the model)."""
    rng = random.Random(f"{family}:{seed}")
    block_size = rng.choice((1, 2, 3, 4, 4, 8, 16))
    config: dict[str, Any] = dict(
        block_size=block_size,
        max_batch_tokens=rng.choice((1, 3, 7, 16, 40, 128, 1024)),
        max_num_seqs=rng.choice((1, 2, 3, 8, 8)),
        cpu_kernel=rng.random() < 0.7,
        state_cache_memory=rng.choice((0, 64 << 10, 1 << 30)),
        image_cache_memory=rng.choice((0, 4 << 10, 512 << 20)),
        check_integrity=True,
    )
    plans: list[Plan] = []
    requests = rng.randrange(1, 9)
    short = rng.random() < 0.3  # short prompts, long answers
    for i in range(requests):
        if plans and rng.random() < 0.15:  # another choice of the same request (OpenAI's n): same prompt, next seed
            twin = plans[-1]
            plans.append(Plan(f"r{i}", twin.conversation, twin.key, twin.max_tokens, twin.priority, twin.arrive,
                              twin.temperature, None if twin.seed is None else twin.seed + 1, twin.top_k, twin.top_p))
            continue
        conversation, key = draw_conversation(rng, short)
        if rng.random() < 0.25:  # the template's default: Qwen3.5 thinks (its output parsed into thinking)
            conversation = Conversation(conversation.turns, thinking=None)
            key = ("thinking", *key)
        kind = rng.random()
        plan = Plan(
            id=f"r{i}", conversation=conversation, key=key, max_tokens=rng.randrange(20, MAX_TOKENS + 1) if short else rng.choice((rng.randrange(1, 9), rng.randrange(1, MAX_TOKENS + 1))),
            priority=rng.choice((INTERACTIVE, INTERACTIVE, BACKGROUND)), arrive=rng.choice((0, 0, rng.randrange(8), rng.randrange(30))),
        )
        if kind > 0.6:  # sampled: seeded mostly (checked against itself alone), sometimes not (mechanics only)
            plan.temperature = rng.choice((0.5, 1.0, 1.5))
            plan.seed = rng.randrange(2**32) if kind < 0.92 else None
            plan.top_k = rng.choice((None, None, 5, 50))
            plan.top_p = rng.choice((None, None, 0.9))
        if rng.random() < 0.15:
            plan.repetition_penalty = rng.choice((0.7, 1.5))
        if rng.random() < 0.2:
            plan.logprobs = rng.choice((0, 3))
        if rng.random() < 0.3:
            plan.stop_pick = rng.random()
        if rng.random() < 0.2:
            plan.cancel_at = plan.arrive + rng.randrange(25)
            plan.cancel_mid_step = rng.random() < 0.4
        plans.append(plan)
    # The pool: from just over what the longest request needs (preemption certain) to plenty.
    case = Case(family, seed, config, num_blocks=0, prefix_cache=rng.random() < 0.75, plans=plans)
    case.graphs = rng.random() < 0.4
    return case


class Fuzzer:
    """Cases for one model family; references and solo runs are cached across its cases."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.renderer = Renderer(loaded.processor)
        self._prompts: dict[tuple, Any] = {}
        self._references: dict[tuple, list[int]] = {}
        self._solo: dict[tuple, list[int]] = {}
        self._solo_engine: LocalEngine | None = None
        self.family = loaded.model_type

    def prompt(self, plan: Plan) -> Any:
        if plan.key not in self._prompts:
            self._prompts[plan.key] = self.renderer.render(plan.conversation)
        return self._prompts[plan.key]

    def reference(self, plan: Plan) -> list[int]:
        """The model's own greedy tokens for the prompt (MAX_TOKENS of them; a prefix serves less)."""
        key = (plan.key, plan.repetition_penalty)
        if key not in self._references:
            penalty = {} if plan.repetition_penalty == 1.0 else {"repetition_penalty": plan.repetition_penalty}
            self._references[key] = reference_tokens(self.loaded, self.prompt(plan), MAX_TOKENS, **penalty)
        return self._references[key]

    def per_token(self) -> int:
        model = self.loaded.model
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kinds = getattr(text, "layer_types", None)
        layers = sum(k != "linear_attention" for k in kinds) if kinds else text.num_hidden_layers
        return PagedKVCache.bytes_per_block(
            num_layers=layers, block_size=1, kv_heads=text.num_key_value_heads, head_dim=head_dim, dtype=model.dtype
        )

    def solo(self, plan: Plan) -> list[int]:
        """A seeded request's tokens run alone, on an engine of default shape (no stop sequences)."""
        key = (plan.key, plan.max_tokens, plan.temperature, plan.seed, plan.top_k, plan.top_p, plan.repetition_penalty)
        if key not in self._solo:
            if self._solo_engine is None:
                self._solo_engine = LocalEngine(self.loaded, EngineConfig(kv_cache_memory=64 << 20, check_integrity=True))
            alone = Plan(plan.id, plan.conversation, plan.key, plan.max_tokens, INTERACTIVE, 0,
                         plan.temperature, plan.seed, plan.top_k, plan.top_p, repetition_penalty=plan.repetition_penalty)
            case = Case(self.family, -1, {}, 0, True, [alone])
            self._solo[key] = drive(self._solo_engine, case, Result(case)).outputs[alone.id]
        return self._solo[key]

    def stops_for(self, plan: Plan, expected_text: str, rng: random.Random) -> tuple[str, ...]:
        """A stop sequence cut from the text the request is expected to write (so it matches),
        or, now and then, one it never writes."""
        if not expected_text or rng.random() < 0.15:
            return ("\u2603never\u2603",)
        assert plan.stop_pick is not None
        at = int(plan.stop_pick * len(expected_text))
        return (expected_text[at : at + rng.randrange(1, 4)],)

    def run(self, seed: int) -> Result:
        case = draw_case(self.family, seed, 0)
        rng = random.Random(f"{self.family}:{seed}:stops")
        # Prompts, references and stops first: they need the prompt, not the engine.
        longest = longest_prompt = 0
        size = case.config["block_size"]
        prompts: list[int] = []  # blocks each prompt needs: a pool just over a batch of them preempts as they grow
        for plan in case.plans:
            prompt = self.prompt(plan)
            longest = max(longest, prompt.input_ids.numel() + plan.max_tokens)
            longest_prompt = max(longest_prompt, prompt.input_ids.numel())
            prompts.append(-(-prompt.input_ids.numel() // size))
            if plan.stop_pick is not None and plan.conversation.thinking is False:
                expected = self.reference(plan) if plan.greedy else (self.solo(plan) if plan.seed is not None else [])
                text = self.loaded.tokenizer.decode(expected[: plan.max_tokens], skip_special_tokens=True)
                plan.stops = self.stops_for(plan, text, rng)
        needed = -(-longest // size)
        batch = min(len(prompts), case.config["max_num_seqs"])
        ordered = sorted(prompts)
        most = rng.choice((sum(ordered[:batch]), sum(ordered[-batch:])))  # the smallest or the largest batch
        tight = max(needed, most + batch - 1 + rng.randrange(3))
        filled = -(-(longest_prompt + rng.randrange(3)) // size)  # the context left: none to a few tokens
        case.num_blocks = rng.choice((filled, needed, needed + 1, tight, tight, tight + 2, 8 * needed))
        engine = LocalEngine(self.loaded, EngineConfig(kv_cache_memory=case.num_blocks * size * self.per_token(), **case.config))
        assert engine.kv_cache.num_blocks == case.num_blocks, (engine.kv_cache.num_blocks, case.num_blocks)
        if case.graphs:
            use_graphs(engine)
        if not case.prefix_cache:  # no setting turns it off: a pool that never finds a prefix is one
            engine.blocks.cached_prefix = lambda tokens, images: []  # type: ignore[method-assign]
        result = Result(case)
        self.check_outputs(case, result, drive(engine, case, result))
        return result

    def check_outputs(self, case: Case, result: Result, outcome: Outcome) -> None:
        tokenizer = self.loaded.tokenizer
        eos = self.loaded.eos_token_ids
        for plan in case.plans:
            outputs = outcome.outputs[plan.id]
            finished = outcome.finished.get(plan.id)
            if finished is None:
                continue  # cancelled before it ended: no more to check
            text = outcome.texts[plan.id]
            if plan.greedy or plan.seed is not None:
                expected = self.reference(plan) if plan.greedy else self.solo(plan)
                expected = expected[: outcome.limits[plan.id]]
                full = tokenizer.decode([t for t in expected if t not in eos], skip_special_tokens=True)
                stop = _first_stop(full, plan.stops)
                if stop is None:
                    assert outputs == expected, f"{plan.id}: {outputs} != expected {expected}"
                    result.count("greedy tokens equal generate()" if plan.greedy else "seeded tokens equal the request alone")
                    parsed = plan.conversation.thinking is None  # text split into thinking, answer and tool calls
                    if not parsed:
                        assert text == full, f"{plan.id}: text {text!r} != {full!r}"
                    ended = bool(expected) and expected[-1] in eos
                    if finished.reason not in (("eos", "tool_use") if ended else ("max_tokens", "context_window")):
                        raise AssertionError(f"{plan.id}: finish reason {finished.reason}")
                else:
                    assert outputs == expected[: len(outputs)], f"{plan.id}: {outputs} is no prefix of {expected}"
                    assert finished.reason == "stop_sequence" and finished.stop_sequence == stop[1], (plan.id, finished)
                    assert text == full[: stop[0]], f"{plan.id}: text {text!r} != {full[: stop[0]]!r}"
                    result.count("stop sequences cut the expected text")


def use_graphs(engine: LocalEngine) -> None:
    """The decode, prefill and vision graph paths, shaped as the engine shapes them on a GPU
    (off one they run their padded, static-buffer steps eagerly)."""
    from localvl.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
    from localvl.engine.vision_graphs import VisionGraphs

    config, runner = engine.config, engine.runner
    if runner.graphs is None:
        max_blocks = -(-engine.loaded.context_length // config.block_size)
        runner.graphs = DecodeGraphs(
            engine.model, engine.kv_cache, config.max_num_seqs, min(max_blocks, engine.kv_cache.num_blocks), engine.linear_states
        )
    if runner.vision_graphs is None:
        runner.vision_graphs = VisionGraphs(engine.model)
    if runner.prefill_graphs is None and not engine.model.hybrid:
        runner.prefill_graphs = PrefillGraphs(engine.model, engine.kv_cache, engine.scheduler.max_batch_tokens)


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    found = [(text.find(s), -len(s), s) for s in stops if s and s in text]
    if not found:
        return None
    at, _, stop = min(found)
    return at, stop


def prepare(engine: LocalEngine, plans: list[Plan]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        return {plan.id: await engine.frontend.prepare(plan.request()) for plan in plans}

    return asyncio.run(main())


def check_step(engine: LocalEngine, result: Result) -> None:
    engine.scheduler.check()
    result.count("block tables agree with the allocator after a step")
    running, waiting = engine.scheduler.running, engine.scheduler.waiting
    assert len(running) <= engine.scheduler.max_num_seqs
    assert not {id(s) for s in running} & {id(s) for s in waiting}, "a sequence both running and waiting"
    blocks = engine.blocks
    for seq in running:
        assert seq.num_computed <= len(seq), f"{seq.id}: {seq.num_computed} computed of {len(seq)}"
        # What the prefix cache says a block holds is what this sequence holds there.
        table = seq.table
        assert table.hashed * blocks.block_size <= seq.num_computed, f"{seq.id}: a block published before it was computed"
        digests = block_hashes(seq.tokens, seq.images, blocks.block_size, table.hashed)
        for digest, block_id in zip(digests, table.blocks):
            held = blocks._blocks[block_id].hash
            assert held in (None, digest), f"{seq.id}: block {block_id} is published under another prefix"
        assert table.tail == (digests[-1] if digests else b""), f"{seq.id}: the table's tail hash drifted"
    result.count("every published block holds the prefix its hash names")
    queued = sum(1 for s in engine.scheduler.sequences() if not s.payload.started)
    assert engine._submitted - engine._started == queued, "the queue counter drifted"
    assert engine.failures == 0, "a step failed"
    if engine.linear_states is not None:
        states = engine.linear_states
        assert len(states._owner) + len(states._free) == states.slots, "a linear-attention slot went missing"


@dataclass
class Outcome:
    """What each request of a case produced."""

    outputs: dict[str, list[int]] = field(default_factory=dict)  # every request's tokens
    finished: dict[str, Finished] = field(default_factory=dict)  # those that were not cancelled
    texts: dict[str, str] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)  # max_new_tokens, as the context cut it


def drive(engine: LocalEngine, case: Case, result: Result) -> Outcome:
    """Run a case's requests to the end, one step at a time on this thread."""
    recorder = Recorder()
    admissions = prepare(engine, case.plans)
    sequences: dict[str, Sequence] = {}
    cancel_in_step: list[Plan] = []
    run = engine.runner.run

    def run_and_cancel(batch: Any) -> Any:  # as a client's disconnect lands while a step runs
        out = run(batch)
        for plan in cancel_in_step:
            sequences[plan.id].payload.cancelled.set()
        cancel_in_step.clear()
        return out

    engine.runner.run = run_and_cancel  # type: ignore[method-assign]
    pending = sorted(case.plans, key=lambda p: p.arrive)
    cancelled: set[str] = set()
    step = 0
    limit = 50 * sum(len(a.ids) + a.max_new_tokens for a in admissions.values()) + 200
    idle = 0
    with torch.inference_mode():
        while pending or len(engine.scheduler):
            while pending and pending[0].arrive <= step:
                plan = pending.pop(0)
                admission = admissions[plan.id]
                job = engine._job(admission, None, recorder, None)
                seq = Sequence(admission.id, admission.ids, admission.images, max_new_tokens=admission.max_new_tokens,
                               priority=admission.priority, payload=job)
                sequences[plan.id] = seq
                engine._active[seq.id] = seq
                engine._submitted += 1
                engine._admit(seq)
            for plan in case.plans:
                if plan.cancel_at == step and plan.id in sequences and plan.id not in cancelled:
                    cancelled.add(plan.id)
                    if plan.cancel_mid_step:
                        cancel_in_step.append(plan)
                    else:
                        sequences[plan.id].payload.cancelled.set()
            engine._drop_cancelled()
            before = engine.steps
            if len(engine.scheduler):
                engine._step()
            check_step(engine, result)
            if engine.steps == before and len(engine.scheduler) and not pending:
                idle += 1
                assert idle < 3, f"deadlock: {len(engine.scheduler)} requests and no step"
            else:
                idle = 0
            step += 1
            assert step < limit, f"no end after {step} steps"
        engine._drop_cancelled()
    engine.runner.run = run  # type: ignore[method-assign]
    result.steps += step
    result.preemptions += engine.scheduler.preemptions
    stats = engine.stats()
    for name in ("preemptions", "image_cache_hits", "states_restored", "graph_replays", "vision_graph_replays", "prefill_graph_replays"):
        result.coverage[name] = result.coverage.get(name, 0) + stats[name]
    result.coverage["cancelled"] = result.coverage.get("cancelled", 0) + len(cancelled)
    result.coverage["cache_read_tokens"] = result.coverage.get("cache_read_tokens", 0) + sum(
        s.cache_read_tokens for s in sequences.values())
    # The end: nothing held, every request that was not cancelled finished once.
    assert len(engine.scheduler) == 0 and not engine._active, "requests left in the engine"
    assert engine.blocks.used_blocks == 0, f"{engine.blocks.used_blocks} blocks leaked"
    engine.blocks.check([])
    assert engine._submitted == engine._started, "the queue counter leaked"
    if engine.linear_states is not None:
        engine.linear_states.sweep()
        assert len(engine.linear_states._free) == engine.linear_states.slots, "linear-attention slots leaked"
    result.count("no block, slot or queue place leaked at the end")
    outcome = Outcome()
    outputs, finished_by, texts, limits = outcome.outputs, outcome.finished, outcome.texts, outcome.limits
    for plan in case.plans:
        seq = sequences[plan.id]
        events = recorder.events.get(plan.id, [])
        outputs[plan.id], limits[plan.id] = list(seq.outputs), seq.max_new_tokens
        errors = [e for e in events if isinstance(e, Exception)]
        assert not errors, f"{plan.id}: {errors}"
        ends = [e for e in events if isinstance(e, Finished)]
        if plan.id in cancelled and not ends:
            result.cancelled += 1
            continue
        assert len(ends) == 1 and events[-1] is ends[0], f"{plan.id}: ends {ends}"
        result.count("every request not cancelled finished exactly once")
        finished = ends[0]
        usage = finished.usage
        prompt_length = len(seq.prompt)
        assert min(usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) >= 0, usage
        assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == prompt_length, (
            f"{plan.id}: {usage} for a prompt of {prompt_length}")
        assert usage.output_tokens == len(seq.outputs) <= seq.max_new_tokens, (plan.id, usage, len(seq.outputs))
        result.count("usage splits the prompt once and counts the output")
        # (a parsed answer's reasoning and tool-call markup have none, as OpenAI's content logprobs)
        if plan.logprobs is not None and finished.reason != "stop_sequence" and plan.conversation.thinking is False:
            entries = [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]
            eos = seq.outputs and seq.outputs[-1] in engine.loaded.eos_token_ids
            assert len(entries) == len(seq.outputs) - bool(eos), (plan.id, len(entries), len(seq.outputs))
            assert all(len(entry.top) == plan.logprobs for entry in entries)
            result.count("logprobs cover every output token")
        finished_by[plan.id] = finished
        texts[plan.id] = "".join(e.text for e in events if isinstance(e, TextDelta))
    return outcome


def load(family: str, root: str) -> Any:
    from pathlib import Path

    from localvl.models.loader import load_model
    from localvl.models.tiny import build_tiny_model

    folder = Path(root) / family
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_tiny_model(folder, family, "tiny")
    return load_model(str(folder), device="cpu", dtype="float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", action="append", required=True)
    parser.add_argument("--seeds", default="0:20", help="first:last (exclusive)")
    parser.add_argument("--models", default="/tmp/localvl-fuzz-models")
    parser.add_argument("--keep-going", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: one is fastest on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    first, last = (int(x) for x in args.seeds.split(":"))
    totals: dict[str, int] = {}
    coverage: dict[str, int] = {}
    failed = cases = 0
    for family in args.family:
        fuzzer = Fuzzer(load(family, args.models))
        for seed in range(first, last):
            started = time.perf_counter()
            try:
                result = fuzzer.run(seed)
            except Exception as error:  # noqa: BLE001 - reported with the seed that reproduces it
                failed += 1
                print(f"FAIL {family} seed {seed}: {type(error).__name__}: {error}", flush=True)
                print("    " + draw_case(family, seed, 0).describe(), flush=True)
                if not args.keep_going:
                    raise
                continue
            cases += 1
            for name, n in result.checks.items():
                totals[name] = totals.get(name, 0) + n
            for name, n in result.coverage.items():
                coverage[name] = coverage.get(name, 0) + n
            print(f"ok {family} seed {seed}: {time.perf_counter() - started:.1f}s blocks={result.case.num_blocks} seqs={result.case.config['max_num_seqs']} steps={result.steps} "
                  f"preemptions={result.preemptions} cancelled={result.cancelled}", flush=True)
    print(f"{cases} cases passed, {failed} failed")
    for name, n in sorted(totals.items()):
        print(f"  {n:8d}  {name}")
    print("exercised:", ", ".join(f"{name} {n}" for name, n in sorted(coverage.items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
