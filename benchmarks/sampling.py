"""One decode step's sampling, the engine's way against the way it was until the fifteenth session,
side by side on the same logits:

- penalties: batched ``apply_penalties`` against row by row (each row's seen ids made distinct with
  ``unique``, which waits on a GPU), results checked equal;
- draws: ``sample_batch`` (an inverted cumulative sum; top-k/top-p among the most likely tokens)
  against sorting every row's vocabulary and ``torch.multinomial``, for each kind of parameters.

    python benchmarks/sampling.py                       # batch 64, Qwen's 151,936-token vocabulary
    python benchmarks/sampling.py --device cuda
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from localvl.engine.sampling import ResolvedSampling, apply_penalties, sample_batch


def row_by_row(logits: torch.Tensor, params: ResolvedSampling, prompts: list[torch.Tensor], outputs: list[list[int]]) -> None:
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        generated = torch.tensor(output, dtype=torch.long, device=logits.device)
        seen = torch.unique(torch.cat([prompt, generated]))
        scores = logits[row, seen]
        logits[row, seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)


def sorted_draws(logits: torch.Tensor, params: list[ResolvedSampling]) -> list[int]:
    """Every row sorted, cut, and drawn by ``torch.multinomial`` (the engine's way until 2026-11-27)."""
    temperature = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
    top_k = torch.tensor([p.top_k for p in params], device=logits.device).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device).unsqueeze(1)
    values, order = torch.sort(logits / temperature, dim=-1, descending=True)
    rank = torch.arange(values.shape[1], device=logits.device).unsqueeze(0)
    values = values.masked_fill((top_k > 0) & (rank >= top_k), float("-inf"))
    probs = torch.softmax(values, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs >= top_p) & (top_p < 1.0) & (rank > 0)
    probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
    return order.gather(1, torch.multinomial(probs, 1)).squeeze(1).tolist()


def timed(run: Callable[[], object], steps: int, device: torch.device) -> float:
    """Milliseconds per call, the best of three runs of ``steps`` calls."""
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / steps * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--prompt", type=int, default=400, help="prompt tokens per row")
    parser.add_argument("--output", type=int, default=64, help="generated tokens per row so far")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=generator).to(device)
    prompts = [torch.unique(torch.randint(0, args.vocab, (args.prompt,), generator=generator)).to(device) for _ in range(args.batch)]
    outputs = [torch.randint(0, args.vocab, (args.output,), generator=generator).tolist() for _ in range(args.batch)]
    params = ResolvedSampling(repetition_penalty=1.05)  # Qwen's generation_config default

    def batched(out: torch.Tensor) -> None:
        apply_penalties(out, list(range(args.batch)), [params] * args.batch, prompts, outputs)

    def serial(out: torch.Tensor) -> None:
        row_by_row(out, params, prompts, outputs)

    # Peaked, as a trained model's next-token distributions mostly are (random logits are flat).
    peaked = logits * 4
    kinds = {"temperature 1": ResolvedSampling(), "top_k 20, top_p 0.8": ResolvedSampling(top_k=20, top_p=0.8),
             "top_p 0.9": ResolvedSampling(top_p=0.9)}
    for name, kind in kinds.items():
        ours = timed(lambda: sample_batch(peaked, [kind] * args.batch), args.steps, device)
        theirs = timed(lambda: sorted_draws(peaked, [kind] * args.batch), args.steps, device)
        print(f"draws, {name}: sample_batch {ours:.2f} ms, sorted {theirs:.2f} ms per step: {theirs / ours:.1f}x")
    a, b = logits.clone(), logits.clone()
    batched(a)
    serial(b)
    assert torch.equal(a, b), "the batched penalties differ from row by row"
    times: dict[str, list[float]] = {"batched": [], "row by row": []}
    for _ in range(3):  # alternated, so the machine's drift lands on both
        for name, run in (("batched", batched), ("row by row", serial)):
            out = logits.clone()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.steps):
                run(out)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) / args.steps * 1000)
    best = {name: min(ms) for name, ms in times.items()}
    print(f"penalties at batch {args.batch}, vocabulary {args.vocab}, {args.prompt}+{args.output} tokens per row, "
          f"{device} ({torch.get_num_threads()} threads): batched {best['batched']:.2f} ms, row by row "
          f"{best['row by row']:.2f} ms per step: {best['row by row'] / best['batched']:.1f}x")


if __name__ == "__main__":
    main()
