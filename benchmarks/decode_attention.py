"""Decode attention on the CPU: the C++ kernel (engine/cpu_decode.py) against the gather path
(blocks gathered into a contiguous copy, then SDPA), side by side.

Two measurements, each interleaving the two paths so that the machine's drift falls on both alike:

1. one layer's decode attention over the paged pool, for the tiny model's shape and the 3B shape:
   ``--rows`` sequences of ``--context`` tokens in scattered blocks;
2. the tiny model's whole decode step in the engine at batch 16 (one 448 px image and ~100 words
   each, 128 tokens), the path switched every step.

    python benchmarks/decode_attention.py
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from localvl.cli import apply_cpu_threads
from localvl.conversation import GenerationRequest, SamplingParams
from localvl.engine import cpu_decode
from localvl.engine.kv_cache import AttentionBatch, PagedKVCache, _attend_rows, additive_mask
from localvl.engine.local import EngineConfig, LocalEngine

try:
    from benchmarks.load import workload
    from benchmarks.models import build
except ImportError:  # run as a script from the benchmarks folder
    from load import workload  # type: ignore[no-redef]
    from models import build  # type: ignore[no-redef]

SHAPES = {"tiny": (4, 2, 16), "3b": (16, 2, 128)}  # query heads, KV heads, head dim


def interleaved(paths: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median µs per call of each path, timed in turn, ``calls`` calls a round."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        fn()
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def layer(shape: str, rows: int, context: int, block_size: int = 16) -> dict[str, float]:
    heads, kv_heads, dim = SHAPES[shape]
    widest = -(-context // block_size)
    cache = PagedKVCache(num_layers=1, num_blocks=rows * widest * 2, block_size=block_size, kv_heads=kv_heads,
                         head_dim=dim, dtype=torch.float32, device="cpu")
    for tensor in (cache.keys[0], cache.values[0]):
        tensor.normal_()
    key_blocks, value_blocks = cache.blocks(0)
    tables = torch.randperm(cache.num_blocks)[: rows * widest].view(rows, widest)  # as a pool that has been in use
    lengths = torch.full((rows,), context)
    q = torch.randn(heads, rows, dim)  # as the engine holds a step's queries
    out = torch.empty(rows, heads, dim)
    slots = torch.arange(widest * block_size)
    gather = AttentionBatch(cache, torch.empty(0, dtype=torch.long), rows=rows, row_blocks=tables,
                            row_mask=additive_mask((slots < lengths.unsqueeze(1)).view(rows, 1, 1, -1), torch.float32))
    kernel = AttentionBatch(cache, torch.empty(0, dtype=torch.long), rows=rows, row_blocks=tables,
                            row_lengths=lengths.to(torch.int32), kernel=True)
    paths = {
        "gather + SDPA": lambda: _attend_rows(q, key_blocks, value_blocks, gather, None, out),
        "kernel": lambda: _attend_rows(q, key_blocks, value_blocks, kernel, None, out),
    }
    return interleaved(paths, rounds=9, calls=20 if shape == "tiny" else 3)


def engine_steps(requests: int, tokens: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = build("tiny", "cpu", "float32", Path(tmp))
    loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())
    # Every request prefilled in one step, so that all of them decode together from the next.
    engine = LocalEngine(loaded, EngineConfig(max_batch_tokens=512 * requests))
    usable = engine.runner.decode_kernel
    run = engine.runner.run
    times: dict[bool, list[float]] = {True: [], False: []}
    turn = [True]

    def clocked(batch):  # type: ignore[no-untyped-def]
        if len(batch) != requests or any(s.count != 1 for s in batch):
            engine.runner.decode_kernel = usable
            return run(batch)
        engine.runner.decode_kernel = turn[0]
        start = time.perf_counter()
        out = run(batch)
        times[turn[0]].append((time.perf_counter() - start) * 1e3)
        turn[0] = not turn[0]
        return out

    engine.runner.run = clocked  # type: ignore[method-assign]

    async def session() -> None:
        await engine.start()
        try:
            for round_ in range(3):
                async def one(i: int, request) -> None:  # type: ignore[no-untyped-def]
                    params = SamplingParams(max_tokens=tokens, temperature=0)
                    async for _ in await engine.submit(GenerationRequest(f"{round_}-{i}", request.conversation(), params)):
                        pass

                await asyncio.gather(*(one(i, r) for i, r in enumerate(workload(requests, 448, seed=100 * round_))))
        finally:
            await engine.stop()

    asyncio.run(session())
    return {"kernel": statistics.median(times[True]), "gather + SDPA": statistics.median(times[False]),
            "steps": min(len(times[True]), len(times[False]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=464, help="tokens each row attends to")
    parser.add_argument("--tokens", type=int, default=128, help="tokens each request generates in the engine run")
    args = parser.parse_args()
    apply_cpu_threads("cpu", None)
    if not cpu_decode.usable(torch.float32, 16, *SHAPES["tiny"]):
        raise SystemExit("the CPU decode kernel cannot be built here (see the warning above)")
    print(f"cpu, {torch.get_num_threads()} torch threads; decode attention, one layer, {args.rows} rows of "
          f"{args.context} tokens, fp32, scattered blocks of 16:")
    for shape in SHAPES:
        heads, kv_heads, dim = SHAPES[shape]
        result = layer(shape, args.rows, args.context)
        print(f"  {shape} shape ({heads} query heads over {kv_heads} KV heads, head dim {dim}): gather + SDPA "
              f"{result['gather + SDPA']:.0f} µs, kernel {result['kernel']:.0f} µs "
              f"({result['gather + SDPA'] / result['kernel']:.2f}x)")
    steps = engine_steps(16, args.tokens)
    print(f"tiny model, the engine's decode step at batch 16 (median of {steps['steps']} steps each, taken in turn): "
          f"gather + SDPA {steps['gather + SDPA']:.2f} ms, kernel {steps['kernel']:.2f} ms "
          f"({steps['gather + SDPA'] / steps['kernel']:.2f}x)")


if __name__ == "__main__":
    main()
