"""Where a batch-16 decode step's CPU goes on this machine: the engine thread's CPU time (not wall
time, which this shared machine makes noisy) for the whole step and for its parts — the decoder
forward, the paged attention inside it (KV gathers and SDPA), the logits — plus page faults.

    python benchmarks/decode_split.py            # tiny model, 16 text requests of ~420 tokens
"""

from __future__ import annotations

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

    timed(kv_cache, "paged_attention", "attention")
    timed(kv_cache, "_gather", "KV gathers")
    timed(kv_cache.F, "scaled_dot_product_attention", "SDPA")
    kv_cache.register_attention()  # the wrapped function, under the engine's name
    engine = LocalEngine(loaded, EngineConfig())
    timed(engine.model, "forward", "forward")
    timed(engine.model, "logits", "logits")
    steps: list[tuple[float, dict[str, float]]] = []
    run = engine.runner.run

    def clocked(batch: Any) -> Any:
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        before, started = dict(spent), time.thread_time()
        out = run(batch)
        total = time.thread_time() - started
        if len(batch) == BATCH and all(s.count == 1 for s in batch):
            parts = {k: spent[k] - before.get(k, 0.0) for k in spent}
            parts["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
            steps.append((total, parts))
        return out

    engine.runner.run = clocked  # type: ignore[method-assign]

    async def session() -> None:
        await engine.start()
        text = "word " * 420

        async def one(i: int) -> None:
            conversation = Conversation([Turn("user", [Text(f"{i} {text}")])])
            stream = await engine.submit(GenerationRequest(f"r{i}", conversation, SamplingParams(max_tokens=96, temperature=0)))
            async for _ in stream:
                pass

        await asyncio.gather(*[one(i) for i in range(BATCH)])
        await engine.stop()

    asyncio.run(session())
    steps = steps[5:]  # past the first waves' warm-up
    median = statistics.median(total for total, _ in steps)
    line = [f"decode steps at batch {BATCH}: {len(steps)}; engine-thread CPU per step, median: {median * 1e3:.2f} ms"]
    for label in ("forward", "attention", "KV gathers", "SDPA", "logits"):
        line.append(f"{label} {statistics.median(p.get(label, 0.0) for _, p in steps) * 1e3:.2f} ms")
    line.append(f"page faults {statistics.median(p['faults'] for _, p in steps):.0f}")
    print("; ".join(line))


if __name__ == "__main__":
    main()
