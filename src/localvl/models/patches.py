"""Qwen-VL image preprocessing without the slow half of transformers' PIL path.

Without torchvision, transformers preprocesses Qwen-VL images with NumPy in float64: rescale,
normalise and cut into patches took ~8 ms of a 448 px image's ~10 ms on this project's CPU
machine (2026-11-26), and rendering sits on every request's time to first token. This keeps the
stock processor — its resize (PIL), its pixel budget, its mean/std and patch sizes, its output
layout — and redoes only the arithmetic after the resize in float32 torch. A test holds it equal to
the stock output on every family.
"""

from __future__ import annotations

from typing import Any

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


class _FastPatches:
    """Mixed in before a stock Qwen-VL image processor class: overrides ``_preprocess`` only."""

    def _preprocess(self, images: list[Any], *args: Any, **kwargs: Any) -> Any:
        from transformers.feature_extraction_utils import BatchFeature

        if args or any(name not in kwargs for name in _NEEDED) or not all(isinstance(i, np.ndarray) and i.ndim == 3 for i in images):
            return super()._preprocess(images, *args, **kwargs)  # type: ignore[misc]
        patch, merge, temporal = kwargs["patch_size"], kwargs["merge_size"], kwargs["temporal_patch_size"]
        all_patches, grids = [], []
        for image in images:
            if kwargs["do_resize"]:
                image = self.resize(image, size=kwargs["size"], resample=kwargs["resample"], factor=patch * merge)  # type: ignore[attr-defined]
            # Patches first, while the pixels are still bytes; then rescale and normalise as one
            # multiply-add (x * scale / std - mean / std); then each patch repeated over the
            # temporal axis (a still image is a clip of identical frames).
            x = patchify(torch.from_numpy(np.ascontiguousarray(image)), patch, merge)
            channels = x.shape[1]
            scale = torch.full((1, channels, 1), float(kwargs["rescale_factor"]) if kwargs["do_rescale"] else 1.0)
            shift = torch.zeros_like(scale)
            if kwargs["do_normalize"]:
                std = _channels(kwargs["image_std"], channels)
                scale, shift = scale / std, -_channels(kwargs["image_mean"], channels) / std
            x = torch.addcmul(shift, x.to(torch.float32), scale).unsqueeze(2)
            all_patches.append(x.expand(-1, -1, temporal, -1).reshape(x.shape[0], -1))
            grids.append([1, image.shape[-2] // patch, image.shape[-1] // patch])
        pixels = all_patches[0] if len(all_patches) == 1 else torch.cat(all_patches)
        data = {"pixel_values": pixels, "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}
        return BatchFeature(data=data, tensor_type=kwargs.get("return_tensors"))


_SUBCLASSES: dict[type, type] = {}


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
