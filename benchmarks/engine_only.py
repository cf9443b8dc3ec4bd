"""The engine alone, no HTTP: what it can do when nothing else in the process wants the GIL.

load.py's workload (one 448 px image + ~100 words, 128 output tokens) submitted straight to a
``LocalEngine`` at a given concurrency, beside the naive ``model.generate`` baseline of the same
run. With ``--prerendered`` the prompts are rendered before the clock starts, so the engine thread
is the only busy one: the ceiling a server can reach around this engine on this machine. With
``--engine-process`` the engine runs in a process of its own as ``localvl serve`` runs it (its
cores split from this process's), still without HTTP.

    python benchmarks/engine_only.py --prerendered [--engine-process]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import time
from typing import Any

try:
    from benchmarks.load import baseline, engine_model, halves, pooled, server_cpu, spread, workload
except ImportError:  # run as a script from benchmarks/
    from load import baseline, engine_model, halves, pooled, server_cpu, spread, workload  # type: ignore[no-redef]

from localvl.cli import apply_cpu_threads, engine_config
from localvl.conversation import GenerationRequest, SamplingParams
from localvl.engine.local import LocalEngine
from localvl.engine.process import ProcessEngine
from localvl.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--image", type=int, default=448)
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--prerendered", action="store_true", help="render every prompt before the clock starts")
    parser.add_argument("--engine-process", action="store_true", help="the engine in a process of its own, as served")
    args = parser.parse_args()

    loaded = engine_model("tiny", "auto", "auto")
    config = dataclasses.replace(engine_config(Settings()), max_queue=100_000)
    engine: Any
    if args.engine_process:
        load = functools.partial(engine_model, "tiny", "auto", "auto")
        engine = ProcessEngine(load, lambda: loaded.processor, config, cpu_affinity=True)
        apply_cpu_threads(loaded.model.device.type, None)
    else:
        apply_cpu_threads(loaded.model.device.type, None)  # as `localvl serve` does
        engine = LocalEngine(loaded, config)
    conversations = [r.conversation() for r in workload(args.requests, args.image, seed=4_242)]
    if args.prerendered:
        compact = args.engine_process  # as an engine process's server renders
        rendered = {id(c): engine.renderer.render(c, compact) for c in conversations}
        render = engine.renderer.render
        engine.renderer.render = lambda c, compact=False: rendered.get(id(c)) or render(c, compact)  # type: ignore[method-assign]
    # Half the baseline before the engine runs and half after, pooled, as load.py takes it.
    first, second = halves(workload(args.baseline_requests, args.image, seed=1))
    before = baseline(loaded, engine, first, args.tokens)

    async def run() -> dict[str, Any]:
        await engine.start()
        gate = asyncio.Semaphore(args.concurrency)

        async def one(i: int, conversation: Any) -> None:
            async with gate:
                request = GenerationRequest(f"r{i}", conversation, SamplingParams(max_tokens=args.tokens, temperature=0))
                async for _ in await engine.submit(request):
                    pass

        await one(-1, workload(1, args.image, seed=99)[0].conversation())  # warm-up
        await asyncio.sleep(0.3)  # an engine process reports its counters at least every 0.1 s
        steps = engine.stats().get("steps", 0)
        started, cpu = time.perf_counter(), server_cpu(engine)
        await asyncio.gather(*[one(i, c) for i, c in enumerate(conversations)])
        elapsed = time.perf_counter() - started
        cpu = server_cpu(engine) - cpu
        await asyncio.sleep(0.3)
        steps = engine.stats().get("steps", 0) - steps
        after = baseline(loaded, engine, second, args.tokens) if second else None  # on the same cores as before
        await engine.stop()
        return {"requests_per_s": args.requests / elapsed, "cpu_ms_per_request": cpu * 1000 / args.requests,
                "steps_per_request": steps / args.requests, "after": after}

    result = asyncio.run(run())
    base = pooled(before, result["after"])
    what = "prompts rendered beforehand" if args.prerendered else "rendering included"
    what += ", in an engine process" if args.engine_process else ""
    print(f"naive model.generate, one at a time: {base['requests_per_s']:.2f} req/s{spread(base)}")
    print(f"engine alone, concurrency {args.concurrency}, {what}: {result['requests_per_s']:.2f} req/s "
          f"({result['requests_per_s'] / base['requests_per_s']:.2f}x the baseline), "
          f"{result['cpu_ms_per_request']:.1f} ms CPU per request (both processes), {result['steps_per_request']:.1f} steps per request")


if __name__ == "__main__":
    main()
