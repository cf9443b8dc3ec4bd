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


GREEDY = ResolvedSampling(temperature=0.0)


def generator_seed(seed: int) -> int:
    """A request's seed as ``torch.Generator.manual_seed`` takes it: any integer, folded into 64 bits
    (the ones it takes as they are; 2**64 had the engine thread die mid-admission)."""
    return seed if -(2**63) <= seed < 2**64 else seed % 2**64


def sample_next(logits: torch.Tensor, params: ResolvedSampling, generator: torch.Generator | None = None) -> int:
    """One token id from a 1-D logits vector (ids that must never be produced already at -inf)."""
    return sample_batch(logits.unsqueeze(0), [params], generator)[0]


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

    Greedy rows are one argmax. Sampling rows are drawn together: rows without a cut by inverting
    their cumulative distribution over the whole vocabulary, rows with top-k or top-p among their
    most likely tokens (``_draw_cut``). No row sorts the vocabulary unless its nucleus is wider
    than ``CANDIDATES`` tokens: on a CPU a sort of 16 rows of Qwen's 152k-token vocabulary took
    203 ms, ``torch.multinomial`` 50 ms (2026-11-27).
    """
    logits = logits.float()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return torch.argmax(logits, dim=-1).tolist()
    device = logits.device
    params_of = [params[i] for i in rows]
    scaled = logits if len(rows) == len(params) else logits[torch.tensor(rows, device=device)]
    if any(p.temperature != 1.0 for p in params_of):
        scaled = scaled / torch.tensor([p.temperature for p in params_of]).to(device, non_blocking=True).unsqueeze(1)
    plain = [i for i, p in enumerate(params_of) if p.top_k <= 0 and p.top_p >= 1.0]
    cut = [i for i, p in enumerate(params_of) if p.top_k > 0 or p.top_p < 1.0]
    draws = torch.empty(len(rows), dtype=torch.long, device=device)
    if plain:
        at = torch.tensor(plain, device=device)
        draws[at] = _invert(torch.softmax(scaled if len(plain) == len(rows) else scaled[at], dim=-1), generator)
    if cut:
        at = torch.tensor(cut, device=device)
        top_k, top_p = [max(params_of[i].top_k, 0) for i in cut], [params_of[i].top_p for i in cut]
        draws[at] = _draw_cut(scaled if len(cut) == len(rows) else scaled[at], top_k, top_p, generator)
    if len(rows) == len(params):
        return draws.tolist()
    greedy = [i for i, p in enumerate(params) if p.greedy]
    chosen = torch.empty(len(params), dtype=torch.long, device=device)
    chosen[torch.tensor(rows, device=device)] = draws
    chosen[torch.tensor(greedy, device=device)] = torch.argmax(logits[torch.tensor(greedy, device=device)], dim=-1)
    return chosen.tolist()


CANDIDATES = 1024  # a top-p row's nucleus is looked for among this many of its most likely tokens first


def _invert(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs [rows, n]`` (unnormalised), drawn by inverting the cumulative
    sum at a uniform point: the first index whose cumulative sum passes it, which never has zero
    probability."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    point = torch.rand(total.shape, device=probs.device, generator=generator) * total
    point = torch.minimum(point, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    return torch.searchsorted(cdf, point, right=True).squeeze(1)


def _draw_cut(
    scaled: torch.Tensor, k: list[int], p: list[float], generator: torch.Generator | None, candidates: int = CANDIDATES
) -> torch.Tensor:
    """One token per row of ``scaled [rows, vocab]`` (logits over temperature) under its top-k
    (exactly k, even when logits tie at the cut; 0: none) and then its top-p (the smallest prefix
    of the rest, renormalised, whose mass reaches top_p; the most likely token always kept).

    Both cuts keep a prefix of the row in descending order, found among its ``width`` most likely
    tokens: all of its top k, or ``candidates`` for a top-p row without one. A top-p row whose
    candidates hold less than top_p of the mass is drawn again with the whole vocabulary as them.
    """
    device, vocab = scaled.device, scaled.shape[1]
    whole = [i for i, limit in enumerate(k) if limit == 0]  # rows without top-k: top-p alone
    width = min(vocab, max(max(k), candidates if whole else 0))
    top_k = torch.tensor(k).to(device, non_blocking=True).unsqueeze(1)
    top_p = torch.tensor(p).to(device, non_blocking=True).unsqueeze(1)
    unlimited = top_k == 0
    values, ids = torch.topk(scaled, width, dim=-1)  # sorted, descending
    rank = torch.arange(width, device=scaled.device).unsqueeze(0)
    values = values.masked_fill(~unlimited & (rank >= top_k), float("-inf"))
    # Probabilities after the top-k cut: renormalised among the k kept, else over the whole vocabulary.
    norm = torch.logsumexp(values, dim=-1, keepdim=True)
    if whole:
        at = torch.tensor(whole, device=device)
        norm[at] = torch.logsumexp(scaled[at], dim=-1, keepdim=True)
    probs = torch.exp(values - norm)
    cumulative = torch.cumsum(probs, dim=-1)
    short = (unlimited & (top_p < 1.0) & (cumulative[:, -1:] < top_p)).squeeze(1)
    drop = (cumulative - probs >= top_p) & (top_p < 1.0) & (rank > 0)
    picked = ids.gather(1, _invert(probs.masked_fill(drop, 0.0), generator).unsqueeze(1)).squeeze(1)
    if width < vocab and whole and bool(short.any()):  # the one wait on the device, for top-p rows only
        rows = short.nonzero().squeeze(1).tolist()
        picked[rows] = _draw_cut(scaled[rows], [0] * len(rows), [p[i] for i in rows], generator, candidates=vocab)
    return picked
