"""Where a batch-16 decode step's CPU goes on this machine: the engine thread's CPU time (not wall
time, which this shared machine makes noisy) for the whole step and for its parts — the decoder
forward, the paged attention inside it (KV gathers and SDPA), the logits — plus page faults.

    python benchmarks/decode_split.py            # tiny model, 16 text requests of ~420 tokens
    python benchmarks/decode_split.py --compile  # the same, the decoder compiled and uncompiled step by step in turn

With ``--compile`` the parts inside the decoder are not timed: a wrapper there would break its graph.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

try:
    from benchmarks.models import build
except ImportError:  # run as a script from benchmarks/
    from models import build  # type: ignore[no-redef]

import localvl.engine.kv_cache as kv_cache
from localvl.cli import apply_cpu_threads
from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
from localvl.engine.local import EngineConfig, LocalEngine

BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="alternate the compiled and the uncompiled decoder every step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = build("tiny", "cpu", "auto", Path(tmp))
    apply_cpu_threads("cpu", None)  # as `localvl serve` does
    loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())  # every request runs its full length
    spent: collections.Counter[str] = collections.Counter()

    def timed(owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.thread_time() - started

        setattr(owner, name, wrapper)

    if not args.compile:  # wrappers inside the decoder would break a compiled graph
        timed(kv_cache, "paged_attention", "attention")
        timed(kv_cache, "_gather", "KV gathers")
        timed(kv_cache.F, "scaled_dot_product_attention", "SDPA")
        kv_cache.register_attention()  # the wrapped function, under the engine's name

    engine = LocalEngine(loaded, EngineConfig(compile=args.compile))
    timed(engine.model, "forward", "forward")
    timed(engine.model, "logits", "logits")
    # Both decoders compute the same thing, so one engine can take them step by step in turn: the
    # machine's drift over seconds then lands on both alike.
    decoders = {"compiled": True, "uncompiled": False} if engine.model.compiled else {"uncompiled": False}
    steps: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in decoders}
    run = engine.runner.run

    def clocked(batch: Any) -> Any:
        name = list(decoders)[engine.steps % len(decoders)]
        engine.model.set_compiled(decoders[name])
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        before, started = dict(spent), time.thread_time()
        out = run(batch)
        total = time.thread_time() - started
        if len(batch) == BATCH and all(s.count == 1 for s in batch):
            parts = {k: spent[k] - before.get(k, 0.0) for k in spent}
            parts["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
            steps[name].append((total, parts))
        return out

    engine.runner.run = clocked  # type: ignore[method-assign]

    async def session() -> None:
        await engine.start()
        text = "word " * 420

        async def one(i: int, round: int) -> None:
            conversation = Conversation([Turn("user", [Text(f"{round} {i} {text}")])])
            request = GenerationRequest(f"r{round}-{i}", conversation, SamplingParams(max_tokens=96, temperature=0))
            stream = await engine.submit(request)
            async for _ in stream:
                pass

        for round in range(2 if args.compile else 1):
            await asyncio.gather(*[one(i, round) for i in range(BATCH)])
        await engine.stop()

    asyncio.run(session())
    for name, timings in steps.items():
        timings = timings[5:]  # past the first waves' warm-up
        median = statistics.median(total for total, _ in timings)
        line = [f"{name}: decode steps at batch {BATCH}: {len(timings)}; engine-thread CPU per step, median: {median * 1e3:.2f} ms"]
        for label in ("forward", "logits") if args.compile else ("forward", "attention", "KV gathers", "SDPA", "logits"):
            line.append(f"{label} {statistics.median(p.get(label, 0.0) for _, p in timings) * 1e3:.2f} ms")
        line.append(f"page faults {statistics.median(p['faults'] for _, p in timings):.0f}")
        print("; ".join(line))


if __name__ == "__main__":
    main()
