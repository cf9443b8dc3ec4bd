"""The fast patch arithmetic must give what the stock PIL image processor gives."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from localvl.models.patches import compact as patches_on
from localvl.models.patches import fast_patches
from localvl.models.processor import load_processor
from tests.conftest import FAMILIES


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    return [
        Image.fromarray(noise(50, 80, 3)),
        Image.fromarray(noise(300, 41, 3)),  # tall, resized up to the pixel budget's multiples
        Image.fromarray(noise(700, 900, 3)),  # resized down
        Image.fromarray(noise(64, 64, 4), "RGBA"),
        Image.fromarray(noise(60, 70, 1)[..., 0], "L"),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_patches_equal_the_stock_image_processor(model_dir, family):
    processor = load_processor(str(model_dir(family)))
    fast = processor.image_processor
    if type(fast).__mro__[1].__name__ != "_FastPatches":
        pytest.skip(f"{type(fast).__name__} is not the PIL path this replaces")
    stock = type(fast).__mro__[2].from_dict(fast.to_dict())
    assert not fast_patches(object())  # anything else is left alone
    for picture in _pictures():
        a = fast(images=[picture], return_tensors="pt")
        b = stock(images=[picture], return_tensors="pt")
        assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
        assert a["pixel_values"].dtype == b["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=1e-5, atol=1e-5)
    both = fast(images=_pictures()[:2], return_tensors="pt")  # several images: concatenated in order
    assert both["pixel_values"].shape[0] == int(both["image_grid_thw"].prod(1).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_patches_make_the_same_pixels_after_pickling(model_dir, family):
    """What crosses to an engine process: each image's bytes, which become the very pixels the
    processor makes (bit for bit), in an eighth of the size."""
    processor = load_processor(str(model_dir(family)))
    fast = processor.image_processor
    if type(fast).__mro__[1].__name__ != "_FastPatches":
        pytest.skip(f"{type(fast).__name__} is not the PIL path this replaces")
    pictures = _pictures()
    full = fast(images=pictures, return_tensors="pt")
    with patches_on():
        compact = fast(images=pictures, return_tensors="pt")
    assert "pixel_values" in fast(images=pictures[:1], return_tensors="pt")  # only within
    assert "pixel_values" not in compact
    assert torch.equal(compact["image_grid_thw"], full["image_grid_thw"])
    patches = compact["patches"]
    assert len(patches) == len(pictures) and all(p.raw.dtype == torch.uint8 for p in patches)
    received = pickle.loads(pickle.dumps(patches, protocol=5))
    assert torch.equal(torch.cat([p.pixels() for p in received]), full["pixel_values"])
    # a byte per value, not four, and one frame of a still image's identical frames
    assert sum(p.raw.numel() for p in patches) * fast.temporal_patch_size == full["pixel_values"].numel()
