"""Choosing the next token from logits under one request's sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ResolvedSampling:
    """Sampling with every default filled in. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut


def sample_next(logits: torch.Tensor, params: ResolvedSampling, generator: torch.Generator | None = None) -> int:
    """One token id from a 1-D logits vector (ids that must never be produced already at -inf)."""
    logits = logits.float()
    if params.temperature <= 0 or params.top_k == 1:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        keep = torch.topk(logits, params.top_k).indices  # exactly k, even when logits tie at the cut
        logits = torch.full_like(logits, float("-inf")).scatter(0, keep, logits[keep])
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p, and always the most likely token
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
