"""Per-key rate limits: requests, input tokens and output tokens per minute, as token buckets.

A bucket holds up to a minute's allowance and refills continuously (the way Anthropic describes
its own limits), so a key can burst to its limit and then runs at the steady rate. Admission
takes one request and needs the token buckets not to be in debt; the tokens a request really used
are charged when it ends (a long answer may push a bucket below zero: the key then waits it off).

``MemoryBuckets`` keeps the state in this process; ``RedisBuckets`` (security/redis_buckets.py)
in a Redis server, so several servers share one key's limits.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from localvl.errors import RateLimitError
from localvl.security.keys import Limits
from localvl.security.redis_slots import SlotsFull

logger = logging.getLogger(__name__)

REQUESTS, INPUT, OUTPUT = "requests", "input-tokens", "output-tokens"


def capacities(limits: Limits) -> dict[str, int]:
    """The limited kinds and their per-minute capacity."""
    found = {REQUESTS: limits.rpm, INPUT: limits.itpm, OUTPUT: limits.otpm}
    return {kind: int(capacity) for kind, capacity in found.items() if capacity is not None}


@dataclass(frozen=True)
class Admission:
    admitted: bool
    levels: dict[str, float]  # each limited kind's level after the decision
    retry_after: float  # seconds until the request would be admitted (0 when it was)


def refill(level: float, elapsed: float, capacity: int) -> float:
    return min(float(capacity), level + elapsed * capacity / 60.0)


def decide(levels: Mapping[str, float], caps: Mapping[str, int]) -> tuple[bool, float]:
    """Whether a request may start with these (refilled) levels, and else how long to wait."""
    wait = 0.0
    for kind, capacity in caps.items():
        need = 1.0 if kind == REQUESTS else 1e-9  # token buckets: only out of debt
        if levels[kind] < need:
            wait = max(wait, (need - levels[kind]) * 60.0 / capacity)
    return wait == 0.0, wait


class Buckets(Protocol):
    async def admit(self, owner: str, caps: Mapping[str, int]) -> Admission: ...

    async def charge(self, owner: str, caps: Mapping[str, int], amounts: Mapping[str, int]) -> None: ...

    async def close(self) -> None: ...


class MemoryBuckets:
    """Buckets in this process (the event loop's thread only: no lock needed)."""

    def __init__(self, clock: object = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[tuple[str, str], tuple[float, float]] = {}  # (owner, kind) -> (level, at)

    def _levels(self, owner: str, caps: Mapping[str, int]) -> dict[str, float]:
        now = self._clock()  # type: ignore[operator]
        levels = {}
        for kind, capacity in caps.items():
            level, at = self._state.get((owner, kind), (float(capacity), now))
            levels[kind] = refill(level, now - at, capacity)
            self._state[(owner, kind)] = (levels[kind], now)
        return levels

    async def admit(self, owner: str, caps: Mapping[str, int]) -> Admission:
        levels = self._levels(owner, caps)
        admitted, wait = decide(levels, caps)
        if admitted and REQUESTS in caps:
            levels[REQUESTS] -= 1
            self._state[(owner, REQUESTS)] = (levels[REQUESTS], self._state[(owner, REQUESTS)][1])
        return Admission(admitted, levels, wait)

    async def charge(self, owner: str, caps: Mapping[str, int], amounts: Mapping[str, int]) -> None:
        levels = self._levels(owner, caps)
        for kind, amount in amounts.items():
            if kind in caps and amount:
                self._state[(owner, kind)] = (levels[kind] - amount, self._state[(owner, kind)][1])

    async def close(self) -> None:
        pass


def _rfc3339(seconds_from_now: float) -> str:
    moment = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=max(0.0, seconds_from_now))
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def headers(caps: Mapping[str, int], levels: Mapping[str, float]) -> dict[str, str]:
    """Anthropic's ``anthropic-ratelimit-*`` headers for the limited kinds; ``reset`` is when the
    bucket is full again."""
    out: dict[str, str] = {}
    for kind, capacity in caps.items():
        level = levels[kind]
        out[f"anthropic-ratelimit-{kind}-limit"] = str(capacity)
        out[f"anthropic-ratelimit-{kind}-remaining"] = str(max(0, math.floor(level)))
        out[f"anthropic-ratelimit-{kind}-reset"] = _rfc3339((capacity - level) * 60.0 / capacity)
    return out


def openai_headers(caps: Mapping[str, int], levels: Mapping[str, float]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers. OpenAI limits tokens as one kind, input and output
    together: of the input and output limits, the one nearer its end speaks for ``tokens``, and
    ``reset-tokens`` is when both are full again."""
    out: dict[str, str] = {}
    if REQUESTS in caps:
        capacity, level = caps[REQUESTS], levels[REQUESTS]
        out["x-ratelimit-limit-requests"] = str(capacity)
        out["x-ratelimit-remaining-requests"] = str(max(0, math.floor(level)))
        out["x-ratelimit-reset-requests"] = duration((capacity - level) * 60.0 / capacity)
    kinds = [kind for kind in (INPUT, OUTPUT) if kind in caps]
    if kinds:
        nearest = min(kinds, key=lambda kind: levels[kind] / caps[kind])
        out["x-ratelimit-limit-tokens"] = str(caps[nearest])
        out["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(levels[nearest])))
        out["x-ratelimit-reset-tokens"] = duration(max((caps[k] - levels[k]) * 60.0 / caps[k] for k in kinds))
    return out


def duration(seconds: float) -> str:
    """A span as OpenAI writes its resets (Go's style): ``20ms``, ``1s``, ``6m0s``, ``1m30.5s``."""
    milliseconds = max(0, round(seconds * 1000))
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    minutes, rest = divmod(milliseconds, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text


HeaderStyle = Callable[[Mapping[str, int], Mapping[str, float]], dict[str, str]]


class Slots(Protocol):
    """Running-request slots shared by several servers (security/redis_slots.py)."""

    async def take(self, owner: str, limit: int) -> str: ...

    def give_back(self, owner: str, slot: str) -> None: ...

    async def close(self) -> None: ...


class RateLimiter:
    """Admission against a key's limits, the headers that tell the client where it stands, and
    the concurrent-request count per key (in ``slots`` shared by several servers, or in this
    process)."""

    def __init__(self, buckets: Buckets, slots: Slots | None = None) -> None:
        self.buckets = buckets
        self.slots = slots
        self._running: dict[str, int] = {}

    async def admit(self, owner: str, limits: Limits, style: HeaderStyle = headers) -> dict[str, str]:
        """The headers for the response, named in ``style`` (Anthropic's by default);
        ``RateLimitError`` (with ``retry-after``) when over a limit."""
        caps = capacities(limits)
        if not caps:
            return {}
        try:
            admission = await self.buckets.admit(owner, caps)
        except Exception as error:  # a shared backend down must not take the model down with it
            logger.warning("rate limits not checked: the backend failed (%s)", type(error).__name__)
            return {}
        found = style(caps, admission.levels)
        if not admission.admitted:
            found["retry-after"] = str(max(1, math.ceil(admission.retry_after)))
            raise RateLimitError("this API key is over its rate limit; retry after the time in retry-after",
                                 headers=found)
        return found

    async def close(self) -> None:
        await self.buckets.close()
        if self.slots is not None:
            await self.slots.close()

    async def charge(self, owner: str, limits: Limits, input_tokens: int, output_tokens: int) -> None:
        caps = capacities(limits)
        if INPUT in caps or OUTPUT in caps:
            try:
                await self.buckets.charge(owner, caps, {INPUT: input_tokens, OUTPUT: output_tokens})
            except Exception as error:
                logger.warning("tokens not charged: the rate-limit backend failed (%s)", type(error).__name__)

    async def enter(self, owner: str, limits: Limits) -> str | None:
        """Count one more running request for this key, or refuse it beyond ``max_streams``;
        the shared slot it took, to give to ``leave``."""
        if limits.max_streams is not None and self.slots is not None:
            try:
                return await self.slots.take(owner, limits.max_streams)
            except SlotsFull as full:
                raise self._full(full.running) from None
            except Exception as error:  # counted here alone meanwhile, as the buckets fail open
                logger.warning("running requests counted per server: the shared count failed (%s)",
                               type(error).__name__)
        running = self._running.get(owner, 0)
        if limits.max_streams is not None and running >= limits.max_streams:
            raise self._full(running)
        self._running[owner] = running + 1
        return None

    @staticmethod
    def _full(running: int) -> RateLimitError:
        return RateLimitError(f"this API key already has {running} requests running, its limit",
                              headers={"retry-after": "1"})

    async def leave(self, owner: str, slot: str | None = None) -> None:
        if slot is not None and self.slots is not None:
            self.slots.give_back(owner, slot)
            return
        running = self._running.get(owner, 0) - 1
        if running > 0:
            self._running[owner] = running
        else:
            self._running.pop(owner, None)
