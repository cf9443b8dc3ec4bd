"""Choosing the next token from logits under one request's sampling parameters."""

from __future__ import annotations

import collections
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
    logits: torch.Tensor,
    rows: list[int],
    params: list[ResolvedSampling],
    prompts: list[torch.Tensor],
    outputs: list[list[int]],
) -> None:
    """Penalise ``rows`` of ``logits [batch, vocab]`` in place, each under its own parameters.

    ``prompts``: each row's distinct prompt ids (a tensor on the logits' device); ``outputs``: its
    generated ids, repeats kept. The repetition penalty applies to every id seen, prompt included,
    as ``RepetitionPenaltyLogitsProcessor`` does; presence and frequency to generated ids, as
    OpenAI's. The whole batch's ids are read and written at once: a few kernels per step, none
    that waits on the GPU (row by row, with a ``unique`` each, it was a few kernels and a sync per
    row). Only the ids touched are, never a ``[rows, vocab]`` array: on a CPU such arrays cost
    ~100 ms a step at batch 64 with a 152k vocabulary.
    """
    device = logits.device

    def on_device(values: list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    repeating = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeating:
        # An id seen twice (prompt and output) is written twice with the same value: no unique needed.
        ids = torch.cat([prompts[i] for i in repeating] + [on_device([t for i in repeating for t in outputs[i]], torch.long)])
        lengths = torch.tensor([len(prompts[i]) for i in repeating] + [len(outputs[i]) for i in repeating])
        owners = torch.tensor([rows[i] for i in repeating] * 2).repeat_interleave(lengths)
        penalty = torch.tensor([params[i].repetition_penalty for i in repeating] * 2, dtype=logits.dtype).repeat_interleave(lengths)
        index = (owners.to(device, non_blocking=True), ids)
        scores, penalty = logits[index], penalty.to(device, non_blocking=True)
        logits[index] = torch.where(scores < 0, scores * penalty, scores / penalty)
    owners, ids, values = [], [], []
    for i, p in enumerate(params):
        if p.presence_penalty or p.frequency_penalty:
            for token, count in collections.Counter(outputs[i]).items():
                owners.append(rows[i])
                ids.append(token)
                values.append(p.presence_penalty + p.frequency_penalty * count)
    if owners:
        index = (on_device(owners, torch.long), on_device(ids, torch.long))
        logits[index] = logits[index] - on_device(values, logits.dtype)


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
