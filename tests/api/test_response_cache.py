"""The response cache's parts: which requests qualify, keys, the model fingerprint, the LRU."""

import asyncio
import os

from localvl.api.response_cache import MemoryCache, RedisCache, cache_key, cacheable, model_fingerprint
from tests.e2e.conftest import free_port


def test_only_deterministic_self_contained_requests_qualify():
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert not cacheable(base)  # sampled by default
    assert cacheable({**base, "temperature": 0})
    assert not cacheable({**base, "temperature": 0, "thread": {"type": "create"}})
    url = {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}
    assert not cacheable({**base, "temperature": 0, "messages": [url]})
    # OpenAI's image parts: a data: URL is the image itself, an http(s) one is fetched.
    inline = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    fetched = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "HTTP://x/y.png"}}]}
    assert cacheable({**base, "seed": 7, "messages": [inline]})
    assert not cacheable({**base, "seed": 7, "messages": [fetched]})


def test_keys_ignore_stream_and_metadata_but_not_owner_or_model():
    data = {"model": "m", "temperature": 0, "messages": []}
    key = cache_key(data, "model-a", "alice")
    assert cache_key({**data, "stream": True, "metadata": {"user_id": "u"}}, "model-a", "alice") == key
    assert cache_key({**data, "stream_options": {"include_usage": True}, "user": "u"}, "model-a", "alice") == key
    assert cache_key(data, "model-a", "bob") != key and cache_key(data, "model-b", "alice") != key
    assert cache_key({**data, "max_tokens": 6}, "model-a", "alice") != key


def test_the_fingerprint_changes_with_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = model_fingerprint(str(tmp_path), None)
    assert model_fingerprint(str(tmp_path), None) == before
    assert model_fingerprint(str(tmp_path), "v2") != before
    (tmp_path / "model.safetensors").write_bytes(b"new weights")
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(str(tmp_path), None) != before
    assert model_fingerprint("Qwen/Qwen2.5-VL-3B-Instruct", None) != model_fingerprint("Qwen/Qwen2.5-VL-7B-Instruct", None)


def test_memory_cache_is_lru_and_expires():
    async def body():
        cache = MemoryCache(entries=2, ttl=60)
        await cache.put("a", {"n": 1})
        await cache.put("b", {"n": 2})
        assert await cache.get("a") == {"n": 1}  # a is now the most recent
        await cache.put("c", {"n": 3})
        assert await cache.get("b") is None and await cache.get("a") == {"n": 1}
        short = MemoryCache(entries=2, ttl=0.01)
        await short.put("a", {"n": 1})
        await asyncio.sleep(0.02)
        assert await short.get("a") is None

    asyncio.run(body())


def test_a_redis_cache_that_cannot_be_reached_misses_and_keeps_nothing():
    async def body():
        cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", ttl=60)
        try:
            await cache.put("a", {"n": 1})
            assert await cache.get("a") is None
        finally:
            await cache.close()

    asyncio.run(body())
