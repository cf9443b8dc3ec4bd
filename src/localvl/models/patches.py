"""Qwen-VL image preprocessing without the slow half of transformers' PIL path.

Without torchvision, transformers preprocesses Qwen-VL images with NumPy in float64: rescale,
normalise and cut into patches took ~8 ms of a 448 px image's ~10 ms on this project's CPU
machine (2026-11-26), and rendering sits on every request's time to first token. This keeps the
stock processor — its resize (PIL), its pixel budget, its mean/std and patch sizes, its output
layout — and redoes only the arithmetic after the resize in float32 torch. A test holds it equal to
the stock output on every family.

Asked for compact output (``compact()``), it stops before the arithmetic: ``Patches`` holds an image's patches
as bytes, an eighth of the float32 pixels the vision tower takes (and half of that again, as a
still image's frames are copies), and makes those pixels wherever they are needed — the engine
process, so that a 448 px image crosses the pipe as 0.6 MB instead of 4.8 MB.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

# The stock image processor whose ``_preprocess`` this replaces (transformers 5's PIL backend; the
# torchvision backend already does this arithmetic in torch).
STOCK_CLASSES = ("Qwen2VLImageProcessorPil",)
_NEEDED = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
           "image_std", "patch_size", "temporal_patch_size", "merge_size")


def _channels(values: Any, channels: int) -> torch.Tensor:
    if isinstance(values, (int, float)):
        values = [values] * channels
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1)


def patchify(image: torch.Tensor, patch_size: int, merge_size: int) -> torch.Tensor:
    """``[C, H, W]`` → ``[patches, C, P * P]``, the patches of a merge group adjacent."""
    channels, height, width = image.shape
    gh, gw = height // patch_size, width // patch_size
    x = image.reshape(channels, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    return x.permute(1, 4, 2, 5, 0, 3, 6).reshape(gh * gw, channels, patch_size * patch_size)


@dataclass
class Patches:
    """An image's patches before the arithmetic, and the arithmetic that makes them pixels.

    Made per image wherever they are made, so an image's pixels are the same bits whether the
    processor or the engine process made them.
    """

    raw: torch.Tensor  # uint8 [patches, channels, patch * patch], a merge group's patches adjacent
    scale: torch.Tensor  # float32 [1, channels, 1]: the rescale factor over std
    shift: torch.Tensor  # float32 [1, channels, 1]: minus the mean over std
    temporal: int  # frames per patch: a still image is a clip of identical frames

    def pixels(self) -> torch.Tensor:
        """float32 ``[patches, channels * temporal * patch * patch]``: what the processor would have made."""
        x = torch.addcmul(self.shift, self.raw.to(torch.float32), self.scale).unsqueeze(2)
        return x.expand(-1, -1, self.temporal, -1).reshape(x.shape[0], -1)

    def __getstate__(self) -> dict[str, object]:
        # NumPy arrays pickle (protocol 5) out of band: no copy into the pickle (process.py).
        return {"raw": self.raw.numpy(), "scale": self.scale.numpy(), "shift": self.shift.numpy(), "temporal": self.temporal}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.raw, self.scale, self.shift = (torch.from_numpy(state[k]) for k in ("raw", "scale", "shift"))
        self.temporal = state["temporal"]


class _FastPatches:
    """Mixed in before a stock Qwen-VL image processor class: overrides ``_preprocess`` only."""

    def _preprocess(self, images: list[Any], *args: Any, **kwargs: Any) -> Any:
        from transformers.feature_extraction_utils import BatchFeature

        if args or any(name not in kwargs for name in _NEEDED) or not all(isinstance(i, np.ndarray) and i.ndim == 3 for i in images):
            return super()._preprocess(images, *args, **kwargs)  # type: ignore[misc]
        patch, merge, temporal = kwargs["patch_size"], kwargs["merge_size"], kwargs["temporal_patch_size"]
        raw, grids = [], []
        for image in images:
            if kwargs["do_resize"]:
                image = self.resize(image, size=kwargs["size"], resample=kwargs["resample"], factor=patch * merge)  # type: ignore[attr-defined]
            # Patches first, while the pixels are still bytes; then (Patches.pixels) rescale and
            # normalise as one multiply-add (x * scale / std - mean / std), and repeat each patch
            # over the temporal axis.
            raw.append(patchify(torch.from_numpy(np.ascontiguousarray(image)), patch, merge))
            grids.append([1, image.shape[-2] // patch, image.shape[-1] // patch])
        channels = raw[0].shape[1]
        scale = torch.full((1, channels, 1), float(kwargs["rescale_factor"]) if kwargs["do_rescale"] else 1.0)
        shift = torch.zeros_like(scale)
        if kwargs["do_normalize"]:
            std = _channels(kwargs["image_std"], channels)
            scale, shift = scale / std, -_channels(kwargs["image_mean"], channels) / std
        patches = [Patches(rows, scale, shift, temporal) for rows in raw]
        grid = torch.tensor(grids, dtype=torch.int64)
        if getattr(_local, "compact", False):
            return BatchFeature(data={"image_grid_thw": grid, "patches": patches})
        pixels = patches[0].pixels() if len(patches) == 1 else torch.cat([p.pixels() for p in patches])
        return BatchFeature(data={"pixel_values": pixels, "image_grid_thw": grid}, tensor_type=kwargs.get("return_tensors"))


_SUBCLASSES: dict[type, type] = {}


_local = threading.local()


@contextlib.contextmanager
def compact() -> Iterator[None]:
    """Within it, the fast image processors on this thread make ``Patches``, not pixel_values.

    Per thread, not an attribute of the processor: nothing of it can reach a saved config.
    """
    _local.compact = True
    try:
        yield
    finally:
        _local.compact = False


def fast_patches(image_processor: Any) -> bool:
    """Switch a stock Qwen-VL image processor (channels-first NumPy path) to the fast arithmetic.

    Returns whether it did; any other processor is left as it is.
    """
    cls = type(image_processor)
    if cls.__name__ not in STOCK_CLASSES or not hasattr(cls, "_preprocess") or not hasattr(cls, "resize"):
        return False
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (_FastPatches, cls), {"__module__": cls.__module__})
    image_processor.__class__ = _SUBCLASSES[cls]
    return True
