"""The response cache: exact repeats of deterministic requests answered from memory.

Opt-in (``--response-cache N``), for Messages and Chat Completions alike. Only requests whose
answer is a function of the request are cached: temperature 0 (or a fixed seed), no thread, no
media named by an http(s) URL (what a URL serves can change). The key hashes the normalised request (``stream`` aside: a streamed request and a plain
one share an answer), the served model and its revision, and the caller's identity unless
``--response-cache-shared`` (requests naming uploaded files, which are
their owner's alone, are keyed by identity even then). In-process LRU by default; Redis when ``--redis-url`` is set, so
several servers share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

IGNORED_FIELDS = ("stream", "stream_options", "metadata", "user")  # do not change the answer


def cacheable(data: dict[str, Any]) -> bool:
    """Whether this request's answer is determined by the request itself."""
    if data.get("thread") is not None:
        return False
    deterministic = data.get("temperature") == 0 or isinstance(data.get("seed"), int)
    return deterministic and not _fetches(data.get("messages", []))


def _fetches(value: Any) -> bool:
    """Whether media is named by an http(s) URL anywhere in ``value`` (data: URLs are content)."""
    if isinstance(value, dict):
        url = value.get("url")
        if isinstance(url, str) and url.lower().startswith(("http://", "https://")):
            return True
        return any(_fetches(v) for v in value.values())
    if isinstance(value, list):
        return any(_fetches(v) for v in value)
    return False


def _names_files(value: Any) -> bool:
    """Whether an uploaded file is named (a ``file_id``) anywhere in ``value``."""
    if isinstance(value, dict):
        return "file_id" in value or any(_names_files(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_files(v) for v in value)
    return False


def model_fingerprint(source: str, revision: str | None) -> str:
    """What identifies the weights answering: the source, the revision asked for, and for a
    folder the names, sizes and times of its files — new weights in the same folder (or a cache
    in Redis outliving a restart) never serve the old weights' answers."""
    parts = [source, revision or ""]
    folder = Path(source)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file():
                stat = path.stat()
                parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(data: dict[str, Any], model: str, owner: str) -> str:
    normalised = {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
    text = json.dumps(normalised, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{model}\0{owner}\0{text}".encode()).hexdigest()


def request_key(state: Any, owner: str, data: dict[str, Any], served: str, dialect: str) -> str | None:
    """The cache key of a request to this app (``state``: the app's state), or None when there is
    no cache or the request is not to be cached."""
    if state.response_cache is None or not cacheable(data):
        return None
    # An uploaded file is its owner's alone: shared answers about one would skip that check.
    who = "" if state.settings.response_cache_shared and not _names_files(data) else owner
    return cache_key(data, f"{dialect}\0{served}\0{state.model_fingerprint}", who)


class ResponseCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, message: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    def __init__(self, entries: int, ttl: float) -> None:
        self.entries = entries
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    async def get(self, key: str) -> dict[str, Any] | None:
        found = self._items.get(key)
        if found is None:
            return None
        if time.monotonic() - found[0] > self.ttl:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return found[1]

    async def put(self, key: str, message: dict[str, Any]) -> None:
        self._items[key] = (time.monotonic(), message)
        self._items.move_to_end(key)
        while len(self._items) > self.entries:
            self._items.popitem(last=False)

    async def close(self) -> None:
        self._items.clear()


class RedisCache:
    """Entries as JSON with Redis's own expiry; Redis's eviction policy bounds the memory."""

    def __init__(self, url: str, ttl: float, prefix: str = "localvl:response:") -> None:
        import redis.asyncio as redis

        self.client: Any = redis.Redis.from_url(url)
        self.ttl = ttl
        self.prefix = prefix

    # Redis down is a miss, and an answer not kept: the cache saves work, it must not fail requests
    # (as the rate limits sharing that Redis let requests through).
    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self.client.get(self.prefix + key)
        except Exception as error:
            logger.warning("response cache not read: Redis failed (%s)", type(error).__name__)
            return None
        return json.loads(raw) if raw else None

    async def put(self, key: str, message: dict[str, Any]) -> None:
        try:
            await self.client.set(self.prefix + key, json.dumps(message), px=int(self.ttl * 1000))
        except Exception as error:
            logger.warning("response cache not written: Redis failed (%s)", type(error).__name__)

    async def close(self) -> None:
        await self.client.aclose()
