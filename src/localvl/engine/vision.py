"""The image-embedding cache: vision-tower outputs by image content, bounded in bytes, LRU.

A chat that sends the same screenshot every turn pays for the vision tower once.
"""

from __future__ import annotations

from collections import OrderedDict

from localvl.engine.qwen_vl import ImageFeatures


class ImageCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ImageFeatures | None:
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return features

    def put(self, key: str, features: ImageFeatures) -> None:
        size = features.nbytes
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
