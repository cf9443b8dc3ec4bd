"""Where an engine step's time goes: torch.profiler over decode steps at a given batch size, and
the pieces of a single request's time to first token (render, vision tower, prefill).

    python benchmarks/profile_step.py --shape 3b --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch

from localvl.cli import apply_cpu_threads
from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
from localvl.engine.local import EngineConfig, LocalEngine

try:
    from benchmarks.load import sync, workload
    from benchmarks.models import build
except ImportError:  # run as a script from the benchmarks folder
    from load import sync, workload  # type: ignore[no-redef]
    from models import build  # type: ignore[no-redef]


def timed(device: torch.device, fn, *args):  # type: ignore[no-untyped-def]
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, (time.perf_counter() - start) * 1000


async def decode(engine: LocalEngine, batch: int, tokens: int) -> None:
    convs = [Conversation([Turn("user", [Text(f"Request {i}. " + "Summarise the invoice. " * 60)])]) for i in range(batch)]

    async def one(i: int, conv: Conversation) -> None:
        stream = await engine.submit(GenerationRequest(f"p{i}", conv, SamplingParams(max_tokens=tokens, temperature=0)))
        async for _ in stream:
            pass

    await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))


async def profile_prefill(engine: LocalEngine, activities: list, sort: str) -> None:  # type: ignore[type-arg]
    """Where one request's time to first token goes: its prefill step (vision tower included), alone."""
    conv = workload(1, 448, seed=777)[0].conversation()
    done: dict[str, float] = {}
    run = engine.runner.run

    def once(batch):  # type: ignore[no-untyped-def]
        if done or not any(s.count > 1 for s in batch):
            return run(batch)
        with torch.profiler.profile(activities=activities) as prof:
            out, ms = timed(engine.model.device, run, batch)
        done["ms"] = ms
        print(f"prefill step of one request ({sum(s.count for s in batch)} tokens, one 448px image): {ms:.1f} ms")
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
        return out

    engine.runner.run = once  # type: ignore[method-assign]
    stream = await engine.submit(GenerationRequest("prefill", conv, SamplingParams(max_tokens=1, temperature=0)))
    async for _ in stream:
        pass
    engine.runner.run = run  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "3b"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prefill", action="store_true", help="also profile one request's prefill step")
    parser.add_argument("--log-level", default="warning", help="localvl's log level (debug shows engine tracebacks)")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("localvl").setLevel(args.log_level.upper())
    with tempfile.TemporaryDirectory() as tmp:
        loaded = build(args.shape, args.device, "auto", Path(tmp))
        apply_cpu_threads(loaded.model.device.type, None)  # as `localvl serve` does
    loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())
    engine = LocalEngine(loaded, EngineConfig(max_num_seqs=max(64, args.batch)))
    device = engine.model.device

    request = workload(1, 448)[0].conversation()
    engine.renderer.render(request)
    prompt, render_ms = timed(device, engine.renderer.render, request)
    engine.model.encode_images(prompt.pixel_values, prompt.image_grid_thw)
    _, vision_ms = timed(device, engine.model.encode_images, prompt.pixel_values, prompt.image_grid_thw)
    print(f"one 448px request: render {render_ms:.1f} ms, vision tower {vision_ms:.1f} ms")

    steps: list[tuple[int, float]] = []
    run = engine.runner.run
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiling = {"on": False, "left": 5, "prof": None}

    def clocked(batch):  # type: ignore[no-untyped-def]
        # The profiler records the thread that starts it: start and stop it here, on the engine thread.
        pure = len(batch) == args.batch and all(s.count == 1 for s in batch)
        if profiling["on"] and pure and profiling["prof"] is None and profiling["left"]:
            profiling["prof"] = torch.profiler.profile(activities=activities, record_shapes=True)
            profiling["prof"].__enter__()
        out, ms = timed(device, run, batch)
        steps.append((sum(s.count for s in batch), ms))
        if profiling["prof"] is not None and profiling["left"]:
            profiling["left"] -= 1
            if not profiling["left"]:
                profiling["prof"].__exit__(None, None, None)
        return out

    engine.runner.run = clocked  # type: ignore[method-assign]

    async def session() -> None:
        await engine.start()
        try:
            await decode(engine, 1, 8)  # warm-up and capture
            await decode(engine, args.batch, 8)
            steps.clear()
            await decode(engine, 1, args.tokens)
            one = [ms for n, ms in steps if n == 1]
            steps.clear()
            profiling["on"] = True
            await decode(engine, args.batch, args.tokens)
            prof = profiling["prof"]
            full = [ms for n, ms in steps if n == args.batch]
            prefill = [(n, ms) for n, ms in steps if n > args.batch]
            print(f"decode step median: batch 1 {sorted(one)[len(one) // 2]:.2f} ms; batch {args.batch} "
                  f"{sorted(full)[len(full) // 2]:.2f} ms over {len(full)} steps; prefill steps {prefill[:4]}")
            print(engine.stats())
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(f"profile of 5 decode steps at batch {args.batch}:")
            print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30, max_name_column_width=70))
            if args.prefill:
                await profile_prefill(engine, activities, sort)
        finally:
            await engine.stop()

    asyncio.run(session())


if __name__ == "__main__":
    main()
