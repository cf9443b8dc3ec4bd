"""Decode steps replayed as CUDA graphs.

A decode step of a 3B model is a few hundred small kernels; launched one by one from Python they
take several times longer than the GPU needs to run them. Each pure-decode step (every sequence
feeding one generated token) is instead padded to a captured shape and replayed. With the decode
kernel (``triton_decode.py``), which reads each row only up to its own length, a shape is a batch-size
bucket, and all of them are captured at start-up (``capture_all``) so no request waits on a capture.
Without it, SDPA reads a gathered copy as wide as the block table, so a shape is a batch-size bucket
and a context-width bucket, captured on first use. Padding rows write to the KV pool's scratch block
and their logits are dropped.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch

from localvl.engine.kv_cache import AttentionBatch, PagedKVCache, PrefillChunk
from localvl.engine.linear_attention import LinearStates, LinearStep

if TYPE_CHECKING:
    from localvl.engine.qwen_vl import QwenVLRunner

logger = logging.getLogger(__name__)

# Above this many (rows x context slots) a replay would hold a large gathered copy of the cache in
# the graph's memory pool; such steps run eagerly.
MAX_GRAPH_SLOTS = 1 << 19


T = TypeVar("T")


def capture(forward: Callable[[], T], device: torch.device, pool: Any = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``forward`` twice on a side stream (kernels and allocator warmed up outside the capture),
    then capture a third run; returns the graph and that run's outputs, which each replay rewrites."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


def buckets(limit: int, start: int = 1) -> list[int]:
    """1, 2, 4, 8, ... below ``limit``, then ``limit`` itself."""
    sizes: list[int] = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return sizes


class DecodeGraphs:
    """``linear``: a hybrid decoder's state slots. Each row's slot is a static buffer too; padding
    rows update the scratch slot. As a replay advances the states it reads, a hybrid's graph is
    captured with every row padding and only then replayed on the step's rows."""

    def __init__(
        self, model: QwenVLRunner, cache: PagedKVCache, max_batch: int, max_blocks: int, linear: LinearStates | None = None
    ) -> None:
        self.model = model
        self.cache = cache
        self.linear = linear
        self.batch_sizes = buckets(max_batch)
        self.widths = buckets(max_blocks, start=min(4, max_blocks))
        device = model.device
        size = cache.block_size
        self.max_batch = self.batch_sizes[-1]
        self.max_width = self.widths[-1]
        self.ids = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, self.max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.blocks = torch.zeros(self.max_batch, self.max_width, dtype=torch.long, device=device)
        self.mask = torch.zeros(self.max_batch, 1, 1, self.max_width * size, dtype=torch.bool, device=device)
        self.lengths = torch.ones(self.max_batch, dtype=torch.int32, device=device)
        self.slots.fill_(cache.scratch_block * size)  # until a step fills them, rows are padding
        self.blocks.fill_(cache.scratch_block)
        self.rows = torch.arange(self.max_batch, device=device)
        self.state_slots = torch.full((self.max_batch,), linear.scratch if linear else 0, dtype=torch.long, device=device)
        self.kernel = False  # set with the runner's: decode attention reads the pool in place
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Off a GPU the padded static-buffer step runs eagerly: the same code path, testable on a CPU.
        self.capture = device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.disabled = False
        self.replays = 0

    def fits(self, rows: int, widest: int) -> bool:
        if self.disabled or rows > self.max_batch or widest > self.max_width:
            return False
        if self.kernel:  # attention reads the pool in place: no gathered copy to bound
            return True
        batch = next(b for b in self.batch_sizes if b >= rows)
        return batch * self._width(widest) * self.cache.block_size <= MAX_GRAPH_SLOTS

    def _width(self, widest: int) -> int:
        if self.kernel:  # the kernel stops at each row's length: the table's width costs nothing
            return self.max_width
        return next(w for w in self.widths if w >= widest)

    def capture_all(self) -> int:
        """Capture every batch-size bucket now (kernel only: one width). Returns how many were captured."""
        if not (self.capture and self.kernel) or self.disabled:
            return 0
        with torch.inference_mode():
            for batch in self.batch_sizes:
                key = (batch, self.max_width)
                if key not in self._graphs:
                    try:
                        self._graphs[key] = self._capture(batch, self.max_width)
                    except Exception as error:  # never fatal: eager steps compute the same thing
                        logger.warning("CUDA graphs disabled: capture failed (%s: %s)", type(error).__name__, error)
                        self.disabled = True
                        return 0
        return len(self._graphs)

    def _forward(self, batch: int, width: int) -> torch.Tensor:
        size = self.cache.block_size
        attention = AttentionBatch(
            self.cache,
            self.slots[:batch],
            rows=batch,
            row_blocks=self.blocks[:batch, :width],
            row_mask=self.mask[:batch, :, :, : width * size],
            row_lengths=self.lengths[:batch],
            kernel=self.kernel,
        )
        if self.linear is not None:
            attention.linear = LinearStep(self.linear, self.rows[:batch], self.state_slots[:batch], [])
        embeds = self.model.embed_tokens(self.ids[:batch])
        hidden = self.model.forward(embeds, self.positions[:, :batch], attention)
        return self.model.logits(hidden)

    def _capture(self, batch: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        logger.debug("capturing a decode graph for batch %d, %d blocks", batch, width)
        return capture(lambda: self._forward(batch, width), self.model.device, self._pool)

    @torch.inference_mode()
    def run(
        self, ids: list[int], positions: torch.Tensor, slots: list[int], blocks: list[list[int]], lengths: list[int],
        state_slots: list[int] | None = None,
    ) -> torch.Tensor | None:
        """Logits ``[rows, vocab]`` of one decode step, or None if it cannot run as a graph (then
        nothing of it ran). ``state_slots``: a hybrid decoder's rows' state slots."""
        rows = len(ids)
        widest = max(len(b) for b in blocks)
        batch = next(b for b in self.batch_sizes if b >= rows)
        width = self._width(widest)
        # The kernel never reads past a row's length, so only the columns in use are written; SDPA
        # gathers the whole width (masked), so there every column must hold a real block.
        filled = widest if self.kernel else width
        size = self.cache.block_size
        scratch = self.cache.scratch_block
        pad = batch - rows
        host_ids = torch.tensor(ids + [0] * pad, dtype=torch.long)
        host_positions = torch.zeros(3, batch, dtype=torch.long)
        host_positions[:, :rows] = positions
        host_slots = torch.tensor(slots + [scratch * size] * pad, dtype=torch.long)
        host_blocks = torch.tensor([b + [scratch] * (filled - len(b)) for b in blocks] + [[scratch] * filled] * pad)
        spans = torch.tensor(lengths + [1] * pad)
        self.ids[:batch].copy_(host_ids, non_blocking=True)
        self.positions[:, :batch].copy_(host_positions, non_blocking=True)
        self.slots[:batch].copy_(host_slots, non_blocking=True)
        self.blocks[:batch, :filled].copy_(host_blocks, non_blocking=True)
        if not self.kernel:  # the kernel reads lengths; the SDPA path needs the mask
            host_mask = torch.arange(width * size).unsqueeze(0) < spans.unsqueeze(1)
            self.mask[:batch, 0, 0, : width * size].copy_(host_mask, non_blocking=True)
        self.lengths[:batch].copy_(spans.to(torch.int32), non_blocking=True)
        host_states = None
        if self.linear is not None:
            assert state_slots is not None
            host_states = torch.tensor(state_slots + [self.linear.scratch] * pad, dtype=torch.long)
            self.state_slots[:batch].copy_(host_states, non_blocking=True)
        key = (batch, width)
        if not self.capture:
            self.replays += 1
            return self._forward(batch, width)[:rows]
        if key not in self._graphs:
            if host_states is not None:  # captured on padding alone: its runs must not advance real states
                self.slots[:batch].fill_(scratch * size)
                self.state_slots[:batch].fill_(self.linear.scratch)  # type: ignore[union-attr]
            try:
                self._graphs[key] = self._capture(batch, width)
            except Exception as error:  # never fatal: eager steps compute the same thing
                logger.warning("CUDA graphs disabled: capture failed (%s: %s)", type(error).__name__, error)
                self.disabled = True
                return None
            if host_states is not None:
                self.slots[:batch].copy_(host_slots, non_blocking=True)
                self.state_slots[:batch].copy_(host_states, non_blocking=True)
        graph, logits = self._graphs[key]
        graph.replay()
        self.replays += 1
        return logits[:rows]


class PrefillGraphs:
    """One sequence's prefill chunk, alone in its step, replayed as a CUDA graph.

    A request's prompt on an otherwise idle engine (its time to first token when it has the server
    to itself) is launch-bound on a GPU: a few hundred tokens through a 3B model's stock layers
    launch ~2,000 kernels (docs/PERFORMANCE.md). Such a chunk is padded to a token bucket (32, 64,
    ..., the step budget) and replayed from a graph for its (token bucket, context width bucket)
    pair: attention reads a width of blocks (1, 2, 4, ... up to ``max_context``) under a mask made
    on the device from the cached prefix's length, so one graph serves every prefix that fits its
    width — a conversation's next turn too, whose prefix no earlier request had (on an H100 a
    graph per exact prefix left a second turn's prefill eager, 2026-11-27). A pair is captured the
    second time it is seen, at most ``max_graphs`` are kept (least recently used let go, one memory
    pool for all), and contexts past ``max_context`` tokens run eagerly. Padding tokens sit after
    the real ones, so causal attention keeps them out of every real token's view; they write to
    the scratch block, and only the last real token's logits are read. Qwen3-VL's chunks with
    image features (deepstack inputs) run eagerly. Off a GPU the padded path runs eagerly (tests).
    """

    def __init__(
        self, model: QwenVLRunner, cache: PagedKVCache, max_tokens: int, *, max_graphs: int = 16, max_context: int = 8192
    ) -> None:
        self.model = model
        self.cache = cache
        self.sizes = buckets(max_tokens, start=min(32, max_tokens))
        self.max_graphs = max_graphs
        self.max_context = max_context
        device = model.device
        size, longest = cache.block_size, self.sizes[-1]
        self.widths = buckets(-(-max_context // size))  # in blocks
        self.padding_slots = cache.scratch_block * size + torch.arange(longest, device=device) % size
        self.embeds = torch.zeros(longest, int(model.text_config.hidden_size), dtype=model.dtype, device=device)
        self.positions = torch.zeros(3, longest, dtype=torch.long, device=device)
        self.slots = self.padding_slots.clone()
        self.blocks = torch.full((self.widths[-1],), cache.scratch_block, dtype=torch.long, device=device)
        self.prefix = torch.zeros(1, dtype=torch.long, device=device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self._seen: collections.Counter[tuple[int, int]] = collections.Counter()  # (tokens, width) buckets
        self._graphs: collections.OrderedDict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = collections.OrderedDict()
        self.capture = device.type == "cuda"  # off a GPU the padded path runs eagerly (tests)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.disabled = False
        self.replays = 0

    def _forward(self, size: int, width: int) -> torch.Tensor:
        chunk = PrefillChunk(0, size, self.blocks[:width], width * self.cache.block_size, prefix=self.prefix)
        attention = AttentionBatch(self.cache, self.slots[:size], prefills=[chunk])
        hidden = self.model.forward(self.embeds[:size], self.positions[:, :size], attention)
        return self.model.logits(hidden.index_select(0, self.last))

    @torch.inference_mode()
    def run(
        self, embeds: torch.Tensor, positions: torch.Tensor, slots: list[int], blocks: list[int], prefix: int
    ) -> torch.Tensor | None:
        """Logits ``[1, vocab]`` of the chunk's last token, or None if it runs eagerly this time.

        ``embeds``/``positions``/``slots`` are the chunk's tokens, which follow ``prefix`` cached
        ones; ``blocks`` hold all of them.
        """
        tokens = embeds.shape[0]
        if self.disabled or tokens > self.sizes[-1] or prefix + tokens > self.max_context:
            return None
        size = next(s for s in self.sizes if s >= tokens)
        needed = -(-(prefix + tokens) // self.cache.block_size)
        width = next(w for w in self.widths if w >= needed)
        key = (size, width)
        if self.capture and key not in self._graphs:
            self._seen[key] += 1
            if self._seen[key] < 2:  # first sight: eagerly, so one-off pairs never pay for a capture
                return None
        table = torch.full((width,), self.cache.scratch_block, dtype=torch.long)
        table[: len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self.embeds[:tokens].copy_(embeds)
        self.positions[:, :tokens].copy_(positions, non_blocking=True)
        self.slots[:tokens].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        self.slots[tokens:size].copy_(self.padding_slots[tokens:size])
        self.blocks[:width].copy_(table, non_blocking=True)
        self.prefix.fill_(prefix)
        self.last.fill_(tokens - 1)
        if not self.capture:
            self.replays += 1
            return self._forward(size, width)
        if key not in self._graphs:
            try:
                self._graphs[key] = capture(lambda: self._forward(size, width), self.model.device, self._pool)
            except Exception as error:  # never fatal: eager steps compute the same thing
                logger.warning("prefill graphs disabled: capture failed (%s: %s)", type(error).__name__, error)
                self.disabled = True
                self._graphs.clear()
                return None
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, logits = self._graphs[key]
        graph.replay()
        self.replays += 1
        return logits
