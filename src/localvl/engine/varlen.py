"""Variable-length attention for the vision towers: every window of every image in a few calls.

Qwen-VL vision towers attend within windows (Qwen2.5-VL) or within each image, over one packed
sequence described by ``cu_seqlens``. Under SDPA the stock code loops over the segments: one
attention call per window — hundreds per image, mostly launch overhead on a GPU and Python on a
CPU. Registered under a name containing "flash", the towers instead hand this function the whole
packed sequence once per layer (their flash-attention path); it batches all segments of equal
length into one SDPA call each. Windows are almost all the same size, so a layer takes 1-3 calls.
"""

from __future__ import annotations

from typing import Any

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
    bounds = cu_seq_lens_q.tolist()
    groups: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            groups.setdefault(end - start, []).append(start)
    out = torch.empty_like(q)
    heads, _, dim = q.shape
    for length, starts in groups.items():
        if len(starts) == 1:  # 4-D: 3-D inputs send SDPA to its slow math kernel (CPU: 15.7 vs 1.6 ms here)
            span = slice(starts[0], starts[0] + length)
            o = F.scaled_dot_product_attention(q[None, :, span], k[None, :, span], v[None, :, span], scale=scaling)
            out[:, span] = o[0]
            continue
        index = (torch.tensor(starts).unsqueeze(1) + torch.arange(length).unsqueeze(0)).flatten().to(q.device)

        def segments(t: torch.Tensor) -> torch.Tensor:  # [heads, n*length, dim] -> [n, heads, length, dim]
            return t.index_select(1, index).view(heads, len(starts), length, dim).transpose(0, 1)

        o = F.scaled_dot_product_attention(segments(q), segments(k), segments(v), scale=scaling)
        out.index_copy_(1, index, o.transpose(0, 1).reshape(heads, len(starts) * length, dim))
    return out.transpose(0, 1).unsqueeze(0), None


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_NAME, varlen_attention)
