"""Rate-limit buckets in Redis, so every server in front of one model shares a key's limits.

Each decision is one Lua script, atomic on the Redis server and timed by its clock (servers'
clocks may disagree). One hash per key identity holds ``level`` and ``at`` per limited kind.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from localvl.security.ratelimit import Admission, decide

# KEYS[1]: the hash. ARGV[1]: JSON {kind: capacity}; ARGV[2]: JSON {kind: amount to take} or ""
# for admission. Returns the JSON of {kind: level} after refilling (and taking, when charging).
_REFILL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local caps = cjson.decode(ARGV[1])
local take = ARGV[2] ~= '' and cjson.decode(ARGV[2]) or nil
local levels = {}
for kind, cap in pairs(caps) do
  local level = tonumber(redis.call('HGET', KEYS[1], kind .. ':level'))
  local at = tonumber(redis.call('HGET', KEYS[1], kind .. ':at'))
  if level == nil then level = cap; at = now end
  level = math.min(cap, level + (now - at) * cap / 60)
  if take ~= nil and take[kind] ~= nil then level = level - take[kind] end
  redis.call('HSET', KEYS[1], kind .. ':level', tostring(level), kind .. ':at', tostring(now))
  levels[kind] = level
end
redis.call('EXPIRE', KEYS[1], 86400)
return cjson.encode(levels)
"""

# Admission: refill, decide as ratelimit.decide does, take the request when admitted; returns
# {admitted, levels}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local caps = cjson.decode(ARGV[1])
local levels = {}
local admitted = 1
for kind, cap in pairs(caps) do
  local level = tonumber(redis.call('HGET', KEYS[1], kind .. ':level'))
  local at = tonumber(redis.call('HGET', KEYS[1], kind .. ':at'))
  if level == nil then level = cap; at = now end
  level = math.min(cap, level + (now - at) * cap / 60)
  levels[kind] = level
  local need = 0.000000001
  if kind == 'requests' then need = 1 end
  if level < need then admitted = 0 end
end
if admitted == 1 and levels['requests'] ~= nil then levels['requests'] = levels['requests'] - 1 end
for kind, level in pairs(levels) do
  redis.call('HSET', KEYS[1], kind .. ':level', tostring(level), kind .. ':at', tostring(now))
end
redis.call('EXPIRE', KEYS[1], 86400)
return cjson.encode({admitted = admitted, levels = levels})
"""


class RedisBuckets:
    def __init__(self, url: str, prefix: str = "localvl:ratelimit:") -> None:
        import redis.asyncio as redis

        self.client: Any = redis.Redis.from_url(url)
        self.prefix = prefix
        self._admit = self.client.register_script(_ADMIT)
        self._refill = self.client.register_script(_REFILL)

    async def admit(self, owner: str, caps: Mapping[str, int]) -> Admission:
        reply = json.loads(await self._admit(keys=[self.prefix + owner], args=[json.dumps(dict(caps))]))
        levels = {kind: float(level) for kind, level in reply["levels"].items()}
        if reply["admitted"]:
            return Admission(True, levels, 0.0)
        return Admission(False, levels, decide(levels, caps)[1])  # refused: nothing was taken

    async def charge(self, owner: str, caps: Mapping[str, int], amounts: Mapping[str, int]) -> None:
        take = {kind: amount for kind, amount in amounts.items() if kind in caps and amount}
        if take:
            await self._refill(keys=[self.prefix + owner], args=[json.dumps(dict(caps)), json.dumps(take)])

    async def close(self) -> None:
        await self.client.aclose()
