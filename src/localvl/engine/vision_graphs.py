"""Vision-tower calls replayed as CUDA graphs, one per image layout.

On a GPU the tower is launch-bound for a call of one or a few images: one 448 px image through
Qwen2.5-VL-3B's 32 blocks took 28.6 ms on an H200 (docs/PERFORMANCE.md) for ~2 ms of arithmetic.
What a call launches depends only on its grids (each image's patch layout): the layout is made on
the CPU (``QwenVLRunner.vision_layout``) and nothing is read back mid-call, so a call is captured
once per layout and replayed, its pixels copied into the graph's input and its features copied
out. A layout is captured the second time it is seen, so one-off sizes never pay for a capture;
only calls of up to ``max_patches`` patches are, because a graph keeps its activations; and at most
``max_graphs`` graphs are kept, the least recently used let go. Off a GPU the same static-buffer
path runs eagerly (tests). A failed capture turns the graphs off, never the call.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from localvl.engine.cuda_graphs import capture

if TYPE_CHECKING:
    from localvl.engine.qwen_vl import ImageFeatures, QwenVLRunner

logger = logging.getLogger(__name__)

Layout = tuple[tuple[int, int, int], ...]  # the grids of a call's images, in order
MAX_SEEN = 4096  # layouts remembered as seen once


@dataclass
class _Graph:
    pixels: torch.Tensor  # the call's input, on the device
    grids: torch.Tensor  # [images, 3] on the CPU
    device_grids: torch.Tensor
    layout: dict[str, Any]
    groups: list[Any]  # varlen.py's grouping of the layout's segments, made before the capture
    graph: torch.cuda.CUDAGraph | None = None  # None off a GPU: run eagerly on the same buffers
    pooled: torch.Tensor | None = None
    deepstack: list[torch.Tensor] | None = None


class VisionGraphs:
    def __init__(self, model: QwenVLRunner, *, max_graphs: int = 4, max_patches: int = 4096) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self.max_patches = max_patches
        self.capture = model.device.type == "cuda"
        self._seen: collections.Counter[Layout] = collections.Counter()
        self._graphs: collections.OrderedDict[Layout, _Graph] = collections.OrderedDict()
        self.disabled = False
        self.replays = 0

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> list[ImageFeatures]:
        """``QwenVLRunner.encode_images``, from a graph where the layout has one (or now gets one)."""
        graph = self._graph(pixel_values, grids)
        if graph is None:
            return self.model.encode_images(pixel_values, grids)
        graph.pixels.copy_(pixel_values, non_blocking=True)
        if graph.graph is not None:
            graph.graph.replay()
        else:  # eagerly, into fixed outputs as a replay writes them
            pooled, deepstack = self.model.tower(graph.pixels, graph.device_grids, graph.layout, graph.groups)
            if graph.pooled is None:
                graph.pooled, graph.deepstack = pooled, deepstack
            else:
                for fixed, new in zip([graph.pooled, *(graph.deepstack or [])], [pooled, *(deepstack or [])]):
                    fixed.copy_(new)
        self.replays += 1
        assert graph.pooled is not None
        # Copied out: the next replay overwrites the graph's outputs, and features live on in caches.
        pooled = graph.pooled.clone()
        deepstack = [f.clone() for f in graph.deepstack] if graph.deepstack is not None else None
        return self.model.image_features(pooled, deepstack, graph.grids)

    def _graph(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> _Graph | None:
        if self.disabled or pixel_values.shape[0] > self.max_patches:
            return None
        key: Layout = tuple((int(t), int(h), int(w)) for t, h, w in grids.tolist())
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        if len(self._seen) >= MAX_SEEN:  # a long-lived server meets endless one-off sizes
            self._seen.clear()
        self._seen[key] += 1
        if self._seen[key] < 2:
            return None
        try:
            graph = self._make(pixel_values, grids.cpu())
        except Exception as error:  # never fatal: the eager call computes the same thing
            logger.warning("vision graphs disabled: capture failed (%s: %s)", type(error).__name__, error)
            self.disabled = True
            return None
        self._graphs[key] = graph
        if len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def _make(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> _Graph:
        model = self.model
        device = model.device
        graph = _Graph(
            pixels=torch.zeros(pixel_values.shape, dtype=model.visual.dtype, device=device),
            grids=grids,
            device_grids=grids.to(device),
            layout=model.vision_layout(grids),
            groups=[],
        )
        if not self.capture:
            return graph
        graph.pixels.copy_(pixel_values)
        # The first warm-up run also groups the segments, so the captured run copies nothing to the GPU.
        graph.graph, (graph.pooled, graph.deepstack) = capture(
            lambda: model.tower(graph.pixels, graph.device_grids, graph.layout, graph.groups), device
        )
        logger.debug("captured a vision graph for %d patches", pixel_values.shape[0])
        return graph
