import torch

from localvl.engine.qwen_vl import ImageFeatures
from localvl.engine.vision import ImageCache


def features(rows: int) -> ImageFeatures:
    return ImageFeatures(torch.zeros(rows, 4))  # 16 bytes a row


def test_lru_within_the_byte_bound():
    cache = ImageCache(max_bytes=100)
    cache.put("a", features(2))
    cache.put("b", features(2))
    cache.put("c", features(2))  # 96 bytes
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", features(2))  # 128 > 100: evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    assert cache.bytes <= 100 and len(cache) == 3
    assert (cache.hits, cache.misses) == (3, 1)


def test_an_entry_larger_than_the_cache_is_not_kept():
    cache = ImageCache(max_bytes=10)
    cache.put("big", features(1))
    assert len(cache) == 0 and cache.bytes == 0


def test_deepstack_layers_count_toward_the_bytes():
    assert ImageFeatures(torch.zeros(2, 4), [torch.zeros(2, 4), torch.zeros(2, 4)]).nbytes == 96
