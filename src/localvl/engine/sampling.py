"""Choosing the next token from logits under one request's sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits of ~1e2 stay far from float32's 3.4e38)


@dataclass(frozen=True)
class ResolvedSampling:
    """Sampling with every default filled in. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # transformers' (CTRL's): every token seen, prompt included
    presence_penalty: float = 0.0  # OpenAI's: tokens already generated, once each
    frequency_penalty: float = 0.0  # OpenAI's: tokens already generated, per occurrence

    @property
    def greedy(self) -> bool:
        """Argmax: temperature 0, top_k 1, or a temperature so small that dividing float32 logits
        by it overflows (1e-40 did) — greedy is sampling's limit as the temperature goes to 0."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def generator_seed(seed: int) -> int:
    """A request's seed as ``torch.Generator.manual_seed`` takes it: any integer, folded into 64 bits
    (the ones it takes as they are; 2**64 had the engine thread die mid-admission)."""
    return seed if -(2**63) <= seed < 2**64 else seed % 2**64


def sample_next(logits: torch.Tensor, params: ResolvedSampling, generator: torch.Generator | None = None) -> int:
    """One token id from a 1-D logits vector (ids that must never be produced already at -inf)."""
    logits = logits.float()
    if params.greedy:
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


def apply_penalties(
    logits: torch.Tensor, params: ResolvedSampling, seen: torch.Tensor, generated: torch.Tensor
) -> None:
    """Penalise one row of logits in place.

    ``seen``: the distinct ids of the prompt and output so far (for the repetition penalty, as
    ``RepetitionPenaltyLogitsProcessor`` does); ``generated``: every output id so far, repeats kept.
    """
    if params.repetition_penalty != 1.0 and seen.numel():
        scores = logits[seen]
        scores = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
        logits[seen] = scores
    if (params.presence_penalty or params.frequency_penalty) and generated.numel():
        ids, counts = torch.unique(generated, return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)


def sample_batch(
    logits: torch.Tensor, params: list[ResolvedSampling], generator: torch.Generator | None = None
) -> list[int]:
    """One token per row of ``logits [rows, vocab]``, each row under its own parameters.

    Greedy rows are one argmax; all sampling rows share one sort, one softmax and one multinomial
    draw (per-row sampling costs a handful of kernels per row per step: ~20 ms at batch 64 on a GPU).
    The same cuts as ``sample_next``: exactly k for top-k, then the smallest prefix reaching top_p.
    """
    logits = logits.float()
    chosen = torch.argmax(logits, dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return chosen.tolist()
    device = logits.device
    params_of = [params[i] for i in rows]
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([p.temperature for p in params_of], device=device).unsqueeze(1)
    top_k = torch.tensor([p.top_k for p in params_of], device=device).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params_of], device=device).unsqueeze(1)
    sorted_logits, order = torch.sort(logits[index] / temperature, dim=-1, descending=True)
    rank = torch.arange(sorted_logits.shape[1], device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill((top_k > 0) & (rank >= top_k), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs >= top_p) & (top_p < 1.0) & (rank > 0)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    draws = torch.multinomial(probs, 1, generator=generator)
    chosen[index] = order.gather(1, draws).squeeze(1)
    return chosen.tolist()
