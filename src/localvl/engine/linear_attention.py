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

A state holds a sequence's whole past, so a cached prefix of KV blocks is of no use without the
state at its end. The engine keeps snapshots at two points of a prompt, block boundaries both:
the last one before its second turn begins (the system prompt and tools, which every new
conversation of an agent or app repeats), and the last one at least ``SNAPSHOT_MARGIN`` tokens
before its end (the generation prompt, which a later turn renders differently, lies after it).
There the state is copied out mid-step and kept under that block's hash (LRU, bounded in bytes).
A later request whose prompt starts the same way — a new conversation with the same system
prompt, the next turn of the chat, the same prompt again — resumes from the furthest: the block
manager reuses a cached prefix only up to a block with a snapshot (``BlockManager.resumable``). A
preempted sequence resumes the same way or recomputes.
"""

from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from localvl.engine.blocks import block_hashes
from localvl.engine.sequence import Sequence, Status

LINEAR_LAYER = "linear_attention"
SNAPSHOT_MARGIN = 8  # tokens: a generation prompt ("<|im_start|>assistant\n<think>\n\n</think>\n\n") and more


def snapshot_points(prompt: list[int], block_size: int, system: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Where a prompt's state is kept for later requests to resume from (block boundaries, in
    order): near its end, and, if it opens with a system turn (``system``: the tokens that open
    one, ``<|im_start|>system``), before the turn after it."""
    points = {(len(prompt) - SNAPSHOT_MARGIN) // block_size * block_size}
    if system and prompt[: len(system)] == list(system):
        try:
            points.add(prompt.index(system[0], len(system)) // block_size * block_size)
        except ValueError:
            pass
    return tuple(sorted(p for p in points if p > 0))


def snapshot_key(seq: Sequence, point: int, block_size: int) -> bytes:
    """The hash of the block that ends at ``point``, as the block manager registers it."""
    return block_hashes(seq.prompt, seq.images, block_size, point // block_size)[-1]


@dataclass
class Snapshot:
    """One sequence's state in every linear layer at one point."""

    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    recurrent: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.recurrent.values()))


def linear_layers(model: Any) -> dict[int, torch.nn.Module]:
    """The decoder's linear-attention modules by layer index; empty for a plain transformer."""
    text = model.config.get_text_config()
    kinds = getattr(text, "layer_types", None) or []
    layers = model.model.language_model.layers
    return {i: layers[i].linear_attn for i, kind in enumerate(kinds) if kind == LINEAR_LAYER}


class LinearStates:
    """Each running sequence's convolution window and recurrent state, in every linear layer.

    One slot per sequence the batch can hold; a sequence takes a slot at its first step and gives
    it back when it stops running (finished, cancelled or preempted: ``sweep``). One more slot,
    ``scratch``, takes the updates of padding rows (decode steps replayed as CUDA graphs).
    """

    def __init__(
        self, layers: dict[int, torch.nn.Module], slots: int, dtype: torch.dtype, device: torch.device, snapshot_memory: int = 0
    ) -> None:
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        for index, layer in layers.items():
            self.conv[index] = torch.zeros(slots + 1, layer.conv_dim, layer.conv_kernel_size - 1, dtype=dtype, device=device)
            # float32, as the stock delta rule keeps it: it accumulates over the whole sequence
            shape = (slots + 1, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim)
            self.recurrent[index] = torch.zeros(shape, dtype=torch.float32, device=device)
        self.slots = slots
        self.scratch = slots
        self._free = list(range(slots - 1, -1, -1))
        self._owner: dict[int, Sequence] = {}  # slot -> sequence
        self._slot: dict[int, int] = {}  # id(sequence) -> slot
        self._covers: dict[int, int] = {}  # slot -> how many of its sequence's tokens its state covers
        self.snapshot_memory = snapshot_memory
        self.snapshots: OrderedDict[bytes, Snapshot] = OrderedDict()  # least recently used first
        self.resumable: set[bytes] = set()  # their keys: the block manager's view (no torch there)
        self.snapshot_bytes = 0
        self.restored = 0

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

    def slot(self, seq: Sequence, start: int, resume: bytes | None = None) -> int:
        """``seq``'s slot, its state made that of its first ``start`` tokens: as it is if it is
        that already, else started over (``start`` 0) or resumed from the snapshot ``resume``."""
        slot = self._slot.get(id(seq))
        if slot is None:
            if not self._free:
                raise RuntimeError("more running sequences than linear-attention state slots")
            slot = self._free.pop()
            self._slot[id(seq)] = slot
            self._owner[slot] = seq
            self._covers[slot] = -1
        if self._covers[slot] != start:  # new, or preempted and back from an earlier point
            if start == 0:
                for tensor in (*self.conv.values(), *self.recurrent.values()):
                    tensor[slot].zero_()
            elif resume is not None:
                self.restore(slot, resume)
            else:
                raise RuntimeError(f"{seq.id} resumes at token {start} with no linear-attention state")
        return slot

    def advance(self, slot: int, covers: int) -> None:
        """The slot's state will cover this many tokens once the step has run."""
        self._covers[slot] = covers

    def decoding(self, rows: list[tuple[Sequence, int]]) -> list[int]:
        """The slots of a decode step's rows ``(sequence, its token's index)``, each state made
        that of the tokens before it, and marked as covering that token too."""
        self.sweep()
        slots = [self.slot(seq, start, seq.table.tail or None) for seq, start in rows]
        for slot, (_, start) in zip(slots, rows):
            self.advance(slot, start + 1)
        return slots

    def holds(self, seq: Sequence) -> bool:
        return id(seq) in self._slot

    def restore(self, slot: int, key: bytes) -> None:
        """Start ``slot`` from the snapshot kept under ``key``."""
        snapshot = self.snapshots.get(key)
        if snapshot is None:  # the block manager only resumes where one is kept
            raise RuntimeError("a prefix hit with no linear-attention snapshot to resume from")
        self.snapshots.move_to_end(key)
        for layer, tensor in self.conv.items():
            tensor[slot] = snapshot.conv[layer]
        for layer, tensor in self.recurrent.items():
            tensor[slot] = snapshot.recurrent[layer]
        self.restored += 1

    def keep(self, key: bytes, snapshot: Snapshot) -> bool:
        """Keep ``snapshot`` under ``key`` unless one is kept there already; False if it was, or if
        it does not fit at all. The least recently used go to make room."""
        if key in self.snapshots:
            self.snapshots.move_to_end(key)
            return False
        size = snapshot.nbytes
        if size > self.snapshot_memory:
            return False
        while self.snapshot_bytes + size > self.snapshot_memory:
            old, evicted = self.snapshots.popitem(last=False)
            self.resumable.discard(old)
            self.snapshot_bytes -= evicted.nbytes
        self.snapshots[key] = snapshot
        self.resumable.add(key)
        self.snapshot_bytes += size
        return True


@dataclass(frozen=True)
class LinearChunk:
    """One sequence's chunk of a step, as the linear layers need it."""

    packed: int  # its first token's index in the packed step
    count: int
    sequence: Sequence
    start: int  # its first token's index in the sequence
    resume: bytes | None = None  # a prefix hit's last block hash: the snapshot to resume from, if its state is not there
    keep_at: tuple[int, ...] = ()  # token indices in (start, start + count], in order: keep the state there


@dataclass
class LinearStep:
    """Where each chunk of a packed step sits, whose state it continues, and which states to keep."""

    states: LinearStates
    singles: torch.Tensor | None  # [rows] packed indices of one-token chunks (decodes)
    single_slots: torch.Tensor | None  # [rows] their slots
    chunks: list[tuple[int, int, int, tuple[int, ...]]]  # (packed start, end, slot, packed points to keep the state at)
    keeps: list[tuple[Sequence, int, int, int]] = field(default_factory=list)  # (sequence, token index, slot, packed point)
    captured: dict[tuple[int, int], Snapshot] = field(default_factory=dict)  # by (slot, packed point), layer by layer


def make_step(states: LinearStates, chunks: list[LinearChunk], device: torch.device) -> LinearStep:
    """A step's layout from its chunks: slots taken, started over or resumed from a snapshot."""
    states.sweep()
    singles: list[int] = []
    single_slots: list[int] = []
    longer: list[tuple[int, int, int, tuple[int, ...]]] = []
    keeps: list[tuple[Sequence, int, int, int]] = []
    for chunk in chunks:
        seq = chunk.sequence
        slot = states.slot(seq, chunk.start, chunk.resume)
        states.advance(slot, chunk.start + chunk.count)
        if chunk.count == 1 and not chunk.keep_at:
            singles.append(chunk.packed)
            single_slots.append(slot)
            continue
        cuts = tuple(chunk.packed + point - chunk.start for point in chunk.keep_at)
        keeps += [(seq, point, slot, cut) for point, cut in zip(chunk.keep_at, cuts)]
        longer.append((chunk.packed, chunk.packed + chunk.count, slot, cuts))
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return LinearStep(
        states, as_tensor(singles) if singles else None, as_tensor(single_slots) if singles else None, longer, keeps
    )


def keep_snapshots(step: LinearStep, block_size: int) -> None:
    """After the step: keep the states it captured, each under its block's hash. A sequence that
    kept a new one reports the tokens it made resumable as cache writes (``cache_creation``)."""
    for seq, point, slot, cut in step.keeps:
        if step.states.keep(snapshot_key(seq, point, block_size), step.captured[slot, cut]):
            seq.cache_created_tokens += max(0, point - seq.cache_read_tokens - seq.cache_created_tokens)


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
        q, k = q.reshape(batch, length, -1, layer.head_k_dim), k.reshape(batch, length, -1, layer.head_k_dim)
        if layer.num_v_heads != layer.num_k_heads:
            # Each query/key head serves a group of value heads. transformers 5.17 (pyproject's floor)
            # repeats them in the layer, before its delta rules; later ones inside the rules, which
            # then repeat nothing more: the same values either way.
            q = q.repeat_interleave(layer.num_v_heads // layer.num_k_heads, dim=2)
            k = k.repeat_interleave(layer.num_v_heads // layer.num_k_heads, dim=2)
        return q, k, v.reshape(batch, length, -1, layer.head_v_dim)

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
    if step.chunks:
        _chunks(fns, layer, step, qkv, g, beta, core, heads)
    normed = layer.norm(core.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
    return layer.out_proj(normed.reshape(1, tokens, -1))


def _chunks(fns: Any, layer: Any, step: LinearStep, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            core: torch.Tensor, heads: Any) -> None:
    """The step's longer chunks: each one's convolution over its window (its state's last tokens,
    then its own), then the delta rule for all of them in a few batched calls. A chunk with states
    to keep runs the rule in pieces, a round per piece, each state copied out where its piece ends.
    Chunks of a round are batched by length (within 2x of each other), padded at their end with
    what the rule pads its own chunks with (zeros: no decay, no update), so nothing changes."""
    conv, recurrent = step.states.conv[layer.layer_idx], step.states.recurrent[layer.layer_idx]
    weight = layer.conv1d.weight.squeeze(1)
    width = layer.conv_kernel_size - 1
    mixed: list[torch.Tensor] = []  # each chunk's convolved q, k, v: [length, conv_dim]
    windows: dict[tuple[int, int], torch.Tensor] = {}  # (slot, packed point) -> the conv state there
    pieces: list[list[tuple[int, int]]] = []
    for first, last, slot, cuts in step.chunks:
        window = torch.cat([conv[slot], qkv[first:last].transpose(0, 1).to(conv.dtype)], dim=-1)
        for cut in cuts:
            windows[slot, cut] = window[:, cut - first : cut - first + width].clone()
        conv[slot] = window[:, -width:]
        length = last - first
        out = fns.causal_conv1d_fn(window.unsqueeze(0), weight, layer.conv1d.bias, activation=layer.activation)
        mixed.append(out[0, :, -length:].transpose(0, 1))
        bounds = (first, *cuts, last)
        pieces.append([(a, b) for a, b in zip(bounds, bounds[1:]) if a < b])
    for round_ in range(max(len(p) for p in pieces)):
        groups: dict[int, list[int]] = {}
        for i, chunk_pieces in enumerate(pieces):
            if round_ < len(chunk_pieces):
                a, b = chunk_pieces[round_]
                groups.setdefault((b - a - 1).bit_length(), []).append(i)
        for members in groups.values():
            spans = [pieces[i][round_] for i in members]
            longest = max(b - a for a, b in spans)
            rows = torch.zeros(len(members), longest, mixed[0].shape[1], dtype=mixed[0].dtype, device=qkv.device)
            decay = torch.zeros(len(members), longest, g.shape[1], dtype=g.dtype, device=qkv.device)
            rate = torch.zeros(len(members), longest, beta.shape[1], dtype=beta.dtype, device=qkv.device)
            for row, (i, (a, b)) in enumerate(zip(members, spans)):
                first = step.chunks[i][0]
                rows[row, : b - a] = mixed[i][a - first : b - first]
                decay[row, : b - a] = g[a:b]
                rate[row, : b - a] = beta[a:b]
            slots = torch.tensor([step.chunks[i][2] for i in members], dtype=torch.long, device=qkv.device)
            q, k, v = heads(rows)
            out, state = fns.torch_chunk_gated_delta_rule(
                q, k, v, g=decay, beta=rate, initial_state=recurrent.index_select(0, slots), output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )
            recurrent.index_copy_(0, slots, state.to(recurrent.dtype))
            for row, (i, (a, b)) in enumerate(zip(members, spans)):
                core[a:b] = out[row, : b - a].to(core.dtype)
                slot, cuts = step.chunks[i][2], step.chunks[i][3]
                if b in cuts:
                    captured = step.captured.setdefault((slot, b), Snapshot())
                    captured.conv[layer.layer_idx] = windows[slot, b]
                    captured.recurrent[layer.layer_idx] = state[row].to(recurrent.dtype).clone()
