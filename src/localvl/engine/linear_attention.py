"""Per-sequence state of a hybrid decoder's linear-attention layers, and the step that uses it.

Qwen3.5's decoders are hybrid: most layers are Gated DeltaNet (linear attention), which keep no
keys and values but, per sequence, a short convolution window and a recurrent matrix per head;
the rest are full attention on the paged KV cache. The stock layer runs a batch of equal-length,
padded sequences; the engine's step is one packed run of many sequences' chunks, so the engine
replaces the layer's token mixing for its steps: the projections run over the packed step, then
each sequence's convolution and delta rule run from, and back into, that sequence's state slot.
Sequences decoding one token are stepped together. The arithmetic is transformers' own functions
(or the kernels transformers swaps in for them where installed), so results equal the stock
model's. Outside a step (``model.generate`` in tests and benchmarks) the layer is itself.

A state holds a sequence's whole past, so it cannot be shared from a prefix the way KV blocks
are: hybrid models run without the prefix cache, and a preempted sequence recomputes its state.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from localvl.engine.sequence import Sequence, Status

LINEAR_LAYER = "linear_attention"


def linear_layers(model: Any) -> dict[int, torch.nn.Module]:
    """The decoder's linear-attention modules by layer index; empty for a plain transformer."""
    text = model.config.get_text_config()
    kinds = getattr(text, "layer_types", None) or []
    layers = model.model.language_model.layers
    return {i: layers[i].linear_attn for i, kind in enumerate(kinds) if kind == LINEAR_LAYER}


class LinearStates:
    """Each running sequence's convolution window and recurrent state, in every linear layer.

    One slot per sequence the batch can hold; a sequence takes a slot at its first step and gives
    it back when it stops running (finished, cancelled or preempted: ``sweep``).
    """

    def __init__(self, layers: dict[int, torch.nn.Module], slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        for index, layer in layers.items():
            self.conv[index] = torch.zeros(slots, layer.conv_dim, layer.conv_kernel_size - 1, dtype=dtype, device=device)
            # float32, as the stock delta rule keeps it: it accumulates over the whole sequence
            shape = (slots, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim)
            self.recurrent[index] = torch.zeros(shape, dtype=torch.float32, device=device)
        self.slots = slots
        self._free = list(range(slots - 1, -1, -1))
        self._owner: dict[int, Sequence] = {}  # slot -> sequence
        self._slot: dict[int, int] = {}  # id(sequence) -> slot

    @staticmethod
    def bytes_per_slot(layers: dict[int, torch.nn.Module], dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for layer in layers.values():
            total += layer.conv_dim * (layer.conv_kernel_size - 1) * size
            total += layer.num_v_heads * layer.head_k_dim * layer.head_v_dim * 4
        return total

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.recurrent.values()))

    def sweep(self) -> None:
        """Give back the slots of sequences no longer running."""
        for slot, seq in list(self._owner.items()):
            if seq.status is not Status.RUNNING:
                del self._owner[slot]
                del self._slot[id(seq)]
                self._free.append(slot)

    def slot(self, seq: Sequence, fresh: bool) -> int:
        """``seq``'s slot, taken now if it has none; ``fresh``: its state starts over (first chunk)."""
        slot = self._slot.get(id(seq))
        if slot is None:
            if not self._free:
                raise RuntimeError("more running sequences than linear-attention state slots")
            slot = self._free.pop()
            self._slot[id(seq)] = slot
            self._owner[slot] = seq
        if fresh:
            for tensor in (*self.conv.values(), *self.recurrent.values()):
                tensor[slot].zero_()
        return slot

    def holds(self, seq: Sequence) -> bool:
        return id(seq) in self._slot


@dataclass
class LinearStep:
    """Where each chunk of a packed step sits, and whose state it continues."""

    states: LinearStates
    singles: torch.Tensor | None  # [rows] packed indices of one-token chunks (decodes)
    single_slots: torch.Tensor | None  # [rows] their slots
    chunks: list[tuple[int, int, int]]  # (packed start, end, slot) of longer chunks


def make_step(states: LinearStates, chunks: list[tuple[int, int, Sequence, bool]], device: torch.device) -> LinearStep:
    """A step's layout from its chunks ``(packed start, token count, sequence, fresh)``."""
    states.sweep()
    singles: list[int] = []
    single_slots: list[int] = []
    longer: list[tuple[int, int, int]] = []
    for start, count, seq, fresh in chunks:
        slot = states.slot(seq, fresh)
        if count == 1:
            singles.append(start)
            single_slots.append(slot)
        else:
            longer.append((start, start + count, slot))
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return LinearStep(
        states, as_tensor(singles) if singles else None, as_tensor(single_slots) if singles else None, longer
    )


def install(layers: dict[int, torch.nn.Module], current: Any) -> None:
    """Make each linear-attention layer follow the engine's step when one is running on its thread.

    ``current()`` returns the step's ``LinearStep`` or None (outside a step: the stock forward).
    """
    for layer in layers.values():
        if getattr(layer, "_localvl_stock_forward", None) is not None:
            continue
        stock = layer.forward
        layer._localvl_stock_forward = stock

        def forward(hidden_states: torch.Tensor, *args: Any, _layer: Any = layer, _stock: Any = stock, **kwargs: Any) -> torch.Tensor:
            step = current()
            if step is None:
                return _stock(hidden_states, *args, **kwargs)
            return mix(_layer, hidden_states, step)

        layer.forward = forward


def _functions(layer: torch.nn.Module) -> Any:
    """The layer's own module: its delta-rule and convolution functions (or their kernels)."""
    return sys.modules[type(layer).__module__]


def mix(layer: Any, hidden_states: torch.Tensor, step: LinearStep) -> torch.Tensor:
    """The Gated DeltaNet token mixer over a packed step ``[1, tokens, hidden]``, per sequence."""
    fns = _functions(layer)
    x = hidden_states[0]
    tokens = x.shape[0]
    qkv = layer.in_proj_qkv(x)  # [tokens, conv_dim]
    z = layer.in_proj_z(x)
    beta = layer.in_proj_b(x).sigmoid()
    g = -layer.A_log.float().exp() * F.softplus(layer.in_proj_a(x).float() + layer.dt_bias)
    weight = layer.conv1d.weight.squeeze(1)
    conv, recurrent = step.states.conv[layer.layer_idx], step.states.recurrent[layer.layer_idx]
    core = torch.empty(tokens, layer.num_v_heads, layer.head_v_dim, dtype=x.dtype, device=x.device)

    def heads(mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[batch, length, conv_dim]`` → query, key, value ``[batch, length, heads, dim]``."""
        q, k, v = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
        batch, length = mixed.shape[:2]
        return (
            q.reshape(batch, length, -1, layer.head_k_dim),
            k.reshape(batch, length, -1, layer.head_k_dim),
            v.reshape(batch, length, -1, layer.head_v_dim),
        )

    if step.singles is not None:
        at, slots = step.singles, step.single_slots
        assert slots is not None
        window = conv.index_select(0, slots)  # updated in place by the stock update, then put back
        mixed = fns.causal_conv1d_update(qkv.index_select(0, at).unsqueeze(-1), window, weight, layer.conv1d.bias, layer.activation)
        conv.index_copy_(0, slots, window)
        q, k, v = heads(mixed.transpose(1, 2))  # [rows, 1, ...]
        out, state = fns.torch_recurrent_gated_delta_rule(
            q, k, v, g=g.index_select(0, at).unsqueeze(1), beta=beta.index_select(0, at).unsqueeze(1),
            initial_state=recurrent.index_select(0, slots), output_final_state=True, use_qk_l2norm_in_kernel=True,
        )
        recurrent.index_copy_(0, slots, state.to(recurrent.dtype))
        core.index_copy_(0, at, out[:, 0].to(core.dtype))
    width = layer.conv_kernel_size - 1
    for start, end, slot in step.chunks:
        length = end - start
        # The previous window before the chunk's own tokens, as the stock cache's update returns it.
        window = torch.cat([conv[slot], qkv[start:end].transpose(0, 1).to(conv.dtype)], dim=-1).unsqueeze(0)
        conv[slot] = window[0, :, -width:]
        mixed = fns.causal_conv1d_fn(window, weight, layer.conv1d.bias, activation=layer.activation)[:, :, -length:]
        q, k, v = heads(mixed.transpose(1, 2))
        out, state = fns.torch_chunk_gated_delta_rule(
            q, k, v, g=g[start:end].unsqueeze(0), beta=beta[start:end].unsqueeze(0),
            initial_state=recurrent[slot : slot + 1], output_final_state=True, use_qk_l2norm_in_kernel=True,
        )
        recurrent[slot] = state[0].to(recurrent.dtype)
        core[start:end] = out[0].to(core.dtype)
    normed = layer.norm(core.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
    return layer.out_proj(normed.reshape(1, tokens, -1))
