"""One engine step on the model: scheduled chunks → packed tensors → forward → next-token logits.

Chunks of single tokens (decoding sequences) are packed first so the paged attention can take
them in one padded call; prefill chunks follow. An image is encoded when a prefill chunk first
reaches it — every such image of the step in one vision-tower call — unless the image cache holds
it: the step's token budget bounds its vision work too, and images a prefix hit skips are never
encoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from localvl.engine.blocks import ImageSpan
from localvl.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from localvl.engine.kv_cache import AttentionBatch, PagedKVCache, PrefillChunk, additive_mask
from localvl.engine.linear_attention import LinearChunk, LinearStates, keep_snapshots, make_step, snapshot_points
from localvl.engine.positions import mrope_positions
from localvl.engine.qwen_vl import ImageFeatures, PromptInputs, QwenVLRunner
from localvl.engine.scheduler import Scheduled
from localvl.engine.sequence import Sequence
from localvl.engine.vision import ImageCache
from localvl.engine.vision_graphs import VisionGraphs
from localvl.models.patches import Patches


SHORT_CHUNK = 16  # chunks up to this many tokens (decodes, prefix-hit remainders) attend as padded rows


@dataclass
class PromptState:
    """What the model needs of a sequence's prompt beyond its token ids."""

    positions: torch.Tensor  # [3, prompt length] M-RoPE positions, on the CPU
    delta: int  # token i past the prompt sits at position i + delta
    keys: list[str] = field(default_factory=list)  # one per image span
    # Until encoded (then None): each image's pixels and grid. Rendered for an engine process, its
    # Patches, which become pixels as the engine process receives them.
    pixels: list[tuple[torch.Tensor | Patches, torch.Tensor] | None] = field(default_factory=list)
    features: list[ImageFeatures | None] = field(default_factory=list)  # each image's, once a chunk reached it
    snapshots: tuple[int, ...] | None = None  # a hybrid's: where its state is kept (``snapshot_points``), once known

    def __getstate__(self) -> dict[str, object]:
        # As NumPy arrays, which pickle protocol 5 passes out of band (no copy into the pickle):
        # the state crosses to an engine process with every request (process.py).
        state = dict(self.__dict__)
        state["positions"] = self.positions.numpy()
        # Only ever sent before any image is encoded: every entry still holds its pixels.
        state["pixels"] = [(p if isinstance(p, Patches) else p.numpy(), grid.numpy()) for p, grid in self.pixels]  # type: ignore[misc]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        # In an engine process, on the thread that reads the server's messages (the server's
        # cores, process.py): the engine thread gets pixels ready for the vision tower.
        state["positions"] = torch.from_numpy(state["positions"])  # type: ignore[call-overload]
        state["pixels"] = [
            (p.pixels() if isinstance(p, Patches) else torch.from_numpy(p), torch.from_numpy(g))
            for p, g in state["pixels"]  # type: ignore[attr-defined]
        ]
        self.__dict__.update(state)


def prepare_prompt(
    prompt: PromptInputs, image_token_id: int, merge: int
) -> tuple[list[int], tuple[ImageSpan, ...], PromptState]:
    """Token ids, image spans and model state of a rendered prompt (CPU only; any thread)."""
    ids = prompt.input_ids.tolist()
    positions, delta = mrope_positions(prompt.input_ids, prompt.image_grid_thw, image_token_id, merge)
    state = PromptState(positions, delta)
    spans: list[ImageSpan] = []
    if (prompt.pixel_values is not None or prompt.patches is not None) and prompt.image_grid_thw is not None:
        grids = prompt.image_grid_thw
        rows: list[torch.Tensor] | list[Patches]
        if prompt.patches is not None:
            rows = prompt.patches
        else:
            assert prompt.pixel_values is not None
            rows = list(prompt.pixel_values.split([int(t * h * w) for t, h, w in grids.tolist()]))
        cursor = 0
        for index, (grid, pixels) in enumerate(zip(grids, rows)):
            t, h, w = (int(x) for x in grid)
            count = t * h * w // merge**2
            cursor = ids.index(image_token_id, cursor)
            if index < len(prompt.image_keys):
                content = prompt.image_keys[index]
            else:
                data = pixels.raw if isinstance(pixels, Patches) else pixels
                content = hashlib.sha256(data.numpy().tobytes()).hexdigest()
            key = f"{content}:{t}x{h}x{w}"
            spans.append(ImageSpan(cursor, count, key))
            state.keys.append(key)
            state.pixels.append((pixels, grid.unsqueeze(0)))
            state.features.append(None)
            cursor += count
    return ids, tuple(spans), state


class StepRunner:
    def __init__(
        self,
        model: QwenVLRunner,
        cache: PagedKVCache,
        images: ImageCache,
        graphs: DecodeGraphs | None = None,
        vision_graphs: VisionGraphs | None = None,
        prefill_graphs: PrefillGraphs | None = None,
        linear_states: LinearStates | None = None,
    ) -> None:
        self.model = model
        self.linear_states = linear_states  # a hybrid decoder's per-sequence state
        self.system_turn: tuple[int, ...] = ()  # the tokens that open a system turn: where a hybrid's state is kept
        self.cache = cache
        self.images = images
        self.graphs = graphs
        self.vision_graphs = vision_graphs
        self.prefill_graphs = prefill_graphs
        self.decode_kernel = False  # set by the engine once triton_decode's self-test passed
        self.max_vision_patches = 16 * 1024  # sixteen 448 px images per vision-tower call
        self.images_encoded = 0
        self.block_size = cache.block_size

    def _decode_graph(self, batch: list[Scheduled]) -> torch.Tensor | None:
        """Logits of a step where every sequence feeds one generated token, from a CUDA graph."""
        graphs = self.graphs
        if graphs is None or not all(s.count == 1 and s.samples and s.start >= len(s.sequence.prompt) for s in batch):
            return None
        size = self.block_size
        blocks = [s.sequence.table.blocks[: s.start // size + 1] for s in batch]
        if not graphs.fits(len(batch), max(len(b) for b in blocks)):
            return None
        ids = [s.sequence.token(s.start) for s in batch]
        positions = torch.tensor([s.start + s.sequence.payload.prompt.delta for s in batch]).expand(3, -1)
        slots = [b[-1] * size + s.start % size for s, b in zip(batch, blocks)]
        lengths = [s.start + 1 for s in batch]
        states = self.linear_states
        if states is None:
            return graphs.run(ids, positions, slots, blocks, lengths)
        rows = [(s.sequence, s.start) for s in batch]
        state_slots = states.decoding(rows)
        logits = graphs.run(ids, positions, slots, blocks, lengths, state_slots)
        if logits is None:  # the step runs eagerly after all: its states are where they were
            for slot, (_, start) in zip(state_slots, rows):
                states.advance(slot, start)
        return logits

    def _encode_reached_images(self, batch: list[Scheduled]) -> None:
        """Features of the images this step's chunks reach that no earlier chunk did: from the image
        cache, or through the vision tower (whole images, all of the step's in as few calls as fit)."""
        reached: list[tuple[PromptState, int]] = []
        missing: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        found: dict[str, ImageFeatures] = {}
        for s in batch:
            seq = s.sequence
            if not seq.images or s.start >= seq.images[-1].end:  # decodes, and chunks past the last image
                continue
            state, end = seq.payload.prompt, s.start + s.count
            for index, span in enumerate(seq.images):
                if span.start >= end:
                    break
                if span.end <= s.start or state.features[index] is not None:
                    continue
                reached.append((state, index))
                key = state.keys[index]
                if key in found or key in missing:
                    continue
                cached = self.images.get(key)
                if cached is not None:
                    found[key] = cached
                else:
                    pixels = state.pixels[index]
                    assert pixels is not None
                    image, grid = pixels
                    missing[key] = (image.pixels() if isinstance(image, Patches) else image, grid)
        for keys in self._vision_batches(missing):
            if len(keys) == 1:  # as they are: no copy of the pixels (4.8 MB for a 448 px image)
                pixel_values, grids = missing[keys[0]]
            else:
                pixel_values = torch.cat([missing[k][0] for k in keys])
                grids = torch.cat([missing[k][1] for k in keys])
            encode = self.vision_graphs.encode if self.vision_graphs is not None else self.model.encode_images
            for key, features in zip(keys, encode(pixel_values, grids)):
                found[key] = features
                self.images.put(key, features)
            self.images_encoded += len(keys)
        for state, index in reached:
            state.features[index] = found[state.keys[index]]
            state.pixels[index] = None

    def _vision_batches(self, missing: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[list[str]]:
        """Images grouped into vision-tower calls of at most ``max_vision_patches`` patches each,
        so a burst of large images cannot spike memory in one call."""
        batches: list[list[str]] = []
        patches = 0
        for key, (pixels, _) in missing.items():
            if batches and patches + pixels.shape[0] <= self.max_vision_patches:
                batches[-1].append(key)
                patches += pixels.shape[0]
            else:
                batches.append([key])
                patches = pixels.shape[0]
        return batches

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        blocks, size = seq.table.blocks, self.block_size
        return [blocks[i // size] * size + i % size for i in range(start, end)]

    def _add_rows(self, attention: AttentionBatch, blocks: list[list[int]], spans: list[tuple[int, int, int]]) -> None:
        """Describe the short chunks as padded rows: blocks, causal masks, and query placement."""
        device = self.model.device
        widest = max(len(b) for b in blocks)
        padded = np.full((len(blocks), widest), self.cache.scratch_block, dtype=np.int64)  # ~2x torch.tensor of lists
        for row, row_blocks in enumerate(blocks):
            padded[row, : len(row_blocks)] = row_blocks
        queries = max(count for _, count, _ in spans)
        ends = torch.tensor([end for _, _, end in spans])
        attention.rows = len(blocks)
        attention.row_blocks = torch.from_numpy(padded).to(device, non_blocking=True)
        if queries == 1 and self.decode_kernel:  # the kernel reads lengths; no mask to build
            attention.kernel = True
            attention.row_lengths = ends.to(torch.int32).to(device, non_blocking=True)
            return
        slots = torch.arange(widest * self.block_size)
        if queries == 1:  # decodes: a row sees its whole context
            mask = (slots.unsqueeze(0) < ends.unsqueeze(1)).view(len(blocks), 1, 1, -1)
            attention.row_mask = additive_mask(mask, self.model.dtype).to(device, non_blocking=True)
            return
        # query t of a row sees keys up to its own index (end - count + t); padding repeats the last
        counts = torch.tensor([count for _, count, _ in spans])
        t = torch.minimum(torch.arange(queries).unsqueeze(0), (counts - 1).unsqueeze(1))  # [rows, queries]
        visible = (ends - counts).unsqueeze(1) + t
        mask = slots.view(1, 1, -1) <= visible.unsqueeze(2)  # [rows, queries, slots]
        attention.row_mask = additive_mask(mask.unsqueeze(1), self.model.dtype).to(device, non_blocking=True)
        starts = torch.tensor([start for start, _, _ in spans])
        attention.row_queries = (starts.unsqueeze(1) + t).to(device, non_blocking=True)
        real = (torch.arange(queries).unsqueeze(0) < counts.unsqueeze(1)).flatten()
        attention.row_sources = real.nonzero().flatten().to(device, non_blocking=True)
        attention.row_targets = attention.row_queries.flatten().cpu()[real].to(device, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: list[Scheduled]) -> tuple[list[Scheduled], torch.Tensor | None]:
        """Run one step; return the chunks that sample and their logits ``[len, vocab]`` (float32)."""
        self.cache.touch(max(max(s.sequence.table.blocks) for s in batch))
        logits = self._decode_graph(batch)
        if logits is not None:
            return batch, logits
        self._encode_reached_images(batch)
        short = [s for s in batch if s.count <= SHORT_CHUNK]
        order = short + [s for s in batch if s.count > SHORT_CHUNK]
        device = self.model.device

        ids: list[int] = []
        prompt_positions: list[tuple[int, torch.Tensor]] = []  # (packed start, [3, tokens]) of prompt tokens
        tail_at: list[int] = []  # packed indices of generated tokens, and their (text-only) positions
        tail_positions: list[int] = []
        slots: list[int] = []
        features: list[tuple[int, torch.Tensor, list[torch.Tensor] | None]] = []  # (packed start, rows, deepstack)
        samplers: list[tuple[Scheduled, int]] = []
        chunks: list[PrefillChunk] = []
        row_blocks: list[list[int]] = []
        row_spans: list[tuple[int, int, int]] = []  # (packed start, tokens, context) of each short chunk
        linear_chunks: list[LinearChunk] = []
        for s in order:
            seq, state = s.sequence, s.sequence.payload.prompt
            start, end = s.start, s.start + s.count
            packed = len(ids)
            ids.extend(seq.span(start, end))
            prompt_length = len(seq.prompt)
            if start < prompt_length:
                prompt_positions.append((packed, state.positions[:, start : min(end, prompt_length)]))
            if end > prompt_length:
                first = max(start, prompt_length)
                tail_at.extend(range(packed + first - start, packed + s.count))
                tail_positions.extend(range(first + state.delta, end + state.delta))
            slots.extend(self._slots(seq, start, end))
            for span, image in zip(seq.images, state.features):
                lo, hi = max(start, span.start), min(end, span.end)
                if lo < hi:
                    assert image is not None
                    rows = slice(lo - span.start, hi - span.start)
                    deep = [layer[rows] for layer in image.deepstack] if image.deepstack is not None else None
                    features.append((packed + lo - start, image.embeds[rows], deep))
            blocks = seq.table.blocks[: -(-end // self.block_size)]
            if s.count <= SHORT_CHUNK:
                row_blocks.append(blocks)
                row_spans.append((packed, s.count, end))
            else:
                context_blocks = torch.tensor(blocks, dtype=torch.long).to(device, non_blocking=True)
                chunks.append(PrefillChunk(packed, packed + s.count, context_blocks, end))
            if s.samples:
                samplers.append((s, packed + s.count - 1))
            if self.linear_states is not None:
                keep_at: tuple[int, ...] = ()
                if start < prompt_length and self.linear_states.snapshot_memory:
                    if state.snapshots is None:
                        state.snapshots = snapshot_points(seq.prompt, self.block_size, self.system_turn)
                    keep_at = tuple(p for p in state.snapshots if start < p <= end)
                # A prefix hit resumes from the snapshot under its last block's hash (the table's tail).
                linear_chunks.append(LinearChunk(packed, s.count, seq, start, seq.table.tail or None, keep_at))

        slot_mapping = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        attention = AttentionBatch(self.cache, slot_mapping, prefills=chunks)
        if row_blocks:
            self._add_rows(attention, row_blocks, row_spans)
        if self.linear_states is not None:
            attention.linear = make_step(self.linear_states, linear_chunks, device)

        embeds = self.model.embed_tokens(torch.tensor(ids, dtype=torch.long))
        visual_mask = None
        deepstack: list[torch.Tensor] | None = None
        if features:
            visual_mask = torch.zeros(len(ids), dtype=torch.bool, device=device)
            for at, rows, _ in features:
                embeds[at : at + rows.shape[0]] = rows
                visual_mask[at : at + rows.shape[0]] = True
            if features[0][2] is not None:
                deepstack = [torch.cat([f[2][i] for f in features]) for i in range(len(features[0][2]))]
        positions = torch.empty(3, len(ids), dtype=torch.long)
        for at, chunk in prompt_positions:
            positions[:, at : at + chunk.shape[1]] = chunk
        if tail_at:
            positions[:, tail_at] = torch.tensor(tail_positions, dtype=torch.long)
        if self.prefill_graphs is not None and len(order) == 1 and order[0].count > 1 and deepstack is None:
            s = order[0]  # one sequence's prefill chunk alone in its step
            blocks = s.sequence.table.blocks[: -(-(s.start + s.count) // self.block_size)]
            logits = self.prefill_graphs.run(embeds, positions, slots, blocks, s.start)
            if logits is not None:
                return ([s], logits) if s.samples else ([], None)
        hidden = self.model.forward(embeds, positions.to(device), attention, visual_mask, deepstack)
        if attention.linear is not None and attention.linear.keeps:
            keep_snapshots(attention.linear, self.block_size)
        if not samplers:
            return [], None
        rows = torch.tensor([row for _, row in samplers], device=device)
        return [s for s, _ in samplers], self.model.logits(hidden[rows])
