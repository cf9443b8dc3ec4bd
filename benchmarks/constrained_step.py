"""What constrained decoding adds to a step with a real vocabulary: every constrained row's
llguidance mask, unpacked and applied to its logits as the engine does it (``allowed_tokens``),
against the unpacking the engine used before (each 32-bit word shifted by 0..31 into a
``[rows, vocab, 32]`` intermediate), side by side in one run; results checked equal.

``python benchmarks/constrained_step.py [--rows 1,16,64] [--device cpu|cuda]``: builds a tiny model
folder with the real Qwen vocabulary (151,936 tokens); the masks are those of a JSON schema
answer, part-way into a string.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"]}},
        "total": {"type": "number"},
    },
    "required": ["vendor", "items", "total"],
}
PREFIX = '{"vendor": "ACME 北京", "items": [{"sku": "A-1", "qty": 3, "price": 2.5}, {"sku": "'


def shifted(matchers: list, vocab: int, device: torch.device) -> torch.Tensor:
    """The engine's unpacking until 2026-11-27, for comparison."""
    import llguidance.torch as llt

    bitmask = llt.allocate_token_bitmask(len(matchers), vocab)
    for row, matcher in enumerate(matchers):
        llt.fill_next_token_bitmask(matcher, bitmask, row)
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(len(matchers), -1)[:, :vocab].bool().to(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from localvl.engine.constraints import Constraints, allowed_tokens
    from localvl.models.tiny import build_tiny_model

    folder = Path(tempfile.mkdtemp()) / "m"
    build_tiny_model(folder, "qwen2_5_vl", "qwen")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = len(tokenizer)
    constraints = Constraints(tokenizer, vocab, frozenset({tokenizer.convert_tokens_to_ids("<|im_end|>")}))
    grammar = "start: %json " + json.dumps(SCHEMA)
    prefix = tokenizer.encode(PREFIX)
    device = torch.device(args.device)
    print(f"vocabulary {vocab}, device {device}, torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'rows':>5} {'before (ms)':>12} {'now (ms)':>10} {'ratio':>7}")
    for rows in [int(r) for r in args.rows.split(",")]:
        matchers = []
        for _ in range(rows):
            matcher = constraints.matcher(grammar)
            for token in prefix:
                assert matcher.consume_token(token), "the prefix leaves the grammar"
            matchers.append(matcher)
        logits = torch.randn(rows, vocab, device=device)
        timings: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(args.repeats):
            masked = {}
            for name, unpack in (("before", shifted), ("now", allowed_tokens)):
                out = logits.clone()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out.masked_fill_(~unpack(matchers, vocab, device), float("-inf"))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings[name].append(time.perf_counter() - start)
                masked[name] = out
            assert torch.equal(masked["before"], masked["now"])
        before, now = (statistics.median(timings[k]) * 1e3 for k in ("before", "now"))
        print(f"{rows:>5} {before:>12.2f} {now:>10.2f} {before / now:>6.1f}x")


if __name__ == "__main__":
    main()
