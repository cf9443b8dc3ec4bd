"""The sampling penalties of one decode step: the engine's batched ``apply_penalties`` against row by
row (each row's seen ids made distinct with ``unique``, the way the engine did it until the
fifteenth session), side by side on the same logits, with their results checked equal.

    python benchmarks/penalties.py                       # batch 64, Qwen's 151,936-token vocabulary
    python benchmarks/penalties.py --device cuda         # on a GPU, where each row's unique waits on it
"""

from __future__ import annotations

import argparse
import time

import torch

from localvl.engine.sampling import ResolvedSampling, apply_penalties


def row_by_row(logits: torch.Tensor, params: ResolvedSampling, prompts: list[torch.Tensor], outputs: list[list[int]]) -> None:
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        generated = torch.tensor(output, dtype=torch.long, device=logits.device)
        seen = torch.unique(torch.cat([prompt, generated]))
        scores = logits[row, seen]
        logits[row, seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)


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
