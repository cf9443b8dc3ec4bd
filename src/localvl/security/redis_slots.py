"""Running-request slots per key in Redis, so ``--max-streams-per-key`` holds across every server
sharing that Redis, not per server.

A key's slots are the members of one sorted set, each scored by the end of its lease (Redis's
clock). A server renews the slots it holds while their requests run and removes each when its
request ends; the slots of a server that was killed lapse within ``lease_s`` instead of holding
the key's count up for good.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

logger = logging.getLogger(__name__)

# KEYS[1]: the key's sorted set. ARGV: limit, slot, lease seconds. Lapsed slots go first; returns
# {admitted (0/1), slots running before this one}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local running = redis.call('ZCARD', KEYS[1])
if running >= tonumber(ARGV[1]) then return {0, running} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return {1, running}
"""

# KEYS[1]: the key's sorted set. ARGV[1]: lease seconds; ARGV[2..]: the slots to keep (only those
# still there: a slot already given back stays gone).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 0
"""


class SlotsFull(Exception):
    def __init__(self, running: int) -> None:
        super().__init__(running)
        self.running = running


class RedisSlots:
    def __init__(self, url: str, prefix: str = "localvl:running:", lease_s: float = 30.0) -> None:
        import redis.asyncio as redis

        self.client: Any = redis.Redis.from_url(url)
        self.prefix = prefix
        self.lease_s = lease_s
        self._take = self.client.register_script(_TAKE)
        self._renew = self.client.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._removing: set[asyncio.Task[None]] = set()

    async def take(self, owner: str, limit: int) -> str:
        """A slot for one more running request of ``owner``; ``SlotsFull`` when it has ``limit``."""
        slot = secrets.token_hex(12)
        admitted, running = await self._take(keys=[self.prefix + owner], args=[limit, slot, self.lease_s])
        if not admitted:
            raise SlotsFull(int(running))
        self._held.setdefault(owner, set()).add(slot)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._keep(), name="localvl-slots")
        return slot

    def give_back(self, owner: str, slot: str) -> None:
        """Removed in the background: a request's end hooks never wait on Redis, nor does a
        cancellation of the request's task cut the ones after this short."""
        held = self._held.get(owner)
        if held is not None:
            held.discard(slot)
            if not held:
                del self._held[owner]
        task = asyncio.get_running_loop().create_task(self._remove(owner, slot))
        self._removing.add(task)
        task.add_done_callback(self._removing.discard)

    async def _remove(self, owner: str, slot: str) -> None:
        try:
            await self.client.zrem(self.prefix + owner, slot)
        except Exception as error:  # it lapses with its lease instead
            logger.warning("running-request slot not given back (%s)", type(error).__name__)

    async def flush(self) -> None:
        """Wait for the slots given back to be gone from Redis."""
        await asyncio.gather(*self._removing, return_exceptions=True)

    async def renew(self) -> None:
        for owner, slots in list(self._held.items()):
            if slots:
                await self._renew(keys=[self.prefix + owner], args=[self.lease_s, *slots])

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.renew()
            except Exception as error:  # Redis away for a moment: the next round renews them
                logger.warning("running-request slots not renewed (%s)", type(error).__name__)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        await self.flush()
        await self.client.aclose()
