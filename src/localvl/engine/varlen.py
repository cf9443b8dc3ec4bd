"""Variable-length attention for the vision towers: every window of every image in a few calls.

Qwen-VL vision towers attend within windows (Qwen2.5-VL) or within each image, over one packed
sequence described by ``cu_seqlens``. Under SDPA the stock code loops over the segments: one
attention call per window — hundreds per image, mostly launch overhead on a GPU and Python on a
CPU. Registered under a name containing "flash", the towers instead hand this function the whole
packed sequence once per layer (their flash-attention path); it batches all segments of equal
length into one SDPA call each. Windows are almost all the same size, so a layer takes 1-3 calls.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.nn.functional as F

VARLEN_NAME = "localvl_flash_varlen"  # "flash" routes the towers to their packed (cu_seqlens) path


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query/key/value ``[1, heads, tokens, dim]`` → ``[1, tokens, heads, dim]``, attending within segments."""
    if cu_seq_lens_q is None or is_causal:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, is_causal=is_causal, **kwargs
        )
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, dim]
    out = torch.empty_like(q)
    heads, _, dim = q.shape
    for length, starts, index in _groups(cu_seq_lens_q, q.device):
        if index is None:  # 4-D: 3-D inputs send SDPA to its slow math kernel (CPU: 15.7 vs 1.6 ms here)
            span = slice(starts[0], starts[0] + length)
            o = F.scaled_dot_product_attention(q[None, :, span], k[None, :, span], v[None, :, span], scale=scaling)
            out[:, span] = o[0]
            continue

        def segments(t: torch.Tensor) -> torch.Tensor:  # [heads, n*length, dim] -> [n, heads, length, dim]
            return t.index_select(1, index).view(heads, len(starts), length, dim).transpose(0, 1)

        o = F.scaled_dot_product_attention(segments(q), segments(k), segments(v), scale=scaling)
        out.index_copy_(1, index, o.transpose(0, 1).reshape(heads, len(starts) * length, dim))
    return out.transpose(0, 1).unsqueeze(0), None


Groups = list[tuple[int, list[int], "torch.Tensor | None"]]  # (length, segment starts, their token indices)
_calls = threading.local()


@contextlib.contextmanager
def one_tower_call(kept: list[Any] | None = None) -> Iterator[None]:
    """Within it, each boundary tensor's grouping is worked out once and kept.

    A tower hands every layer of a kind (all, or Qwen2.5-VL's windowed and full ones) the same
    tensor: the grouping (a read of the boundaries, and on a GPU a copy of the indices to it) is
    then done once per call, not once per layer. Kept by identity, and holding the tensors, so no
    other tensor can come to look like one of them: for this call only, or in ``kept`` for as long
    as its owner holds it (a CUDA graph's layout, whose capture must copy nothing to the device).
    """
    _calls.seen = [] if kept is None else kept
    try:
        yield
    finally:
        _calls.seen = None


def _groups(bounds: torch.Tensor, device: torch.device) -> Groups:
    """The segments of ``bounds`` (cumulative lengths), grouped by length."""
    seen: list[tuple[torch.Tensor, torch.device, Groups]] | None = getattr(_calls, "seen", None)
    for tensor, where, groups in seen or ():
        if tensor is bounds and where == device:
            return groups
    groups = _grouped(bounds, device)
    if seen is not None:
        seen.append((bounds, device, groups))
    return groups


def _grouped(bounds: torch.Tensor, device: torch.device) -> Groups:
    edges = bounds.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(edges[:-1], edges[1:]):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    groups: Groups = []
    for length, starts in starts_by_length.items():
        index = None
        if len(starts) > 1:
            index = (torch.tensor(starts).unsqueeze(1) + torch.arange(length).unsqueeze(0)).flatten().to(device)
        groups.append((length, starts, index))
    return groups


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_NAME, varlen_attention)
