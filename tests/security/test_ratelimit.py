"""Token buckets, in process and in Redis: the same decisions either way."""

import asyncio
import datetime as dt
import secrets

import pytest

from localvl.errors import RateLimitError
from localvl.security.keys import Limits
from localvl.security.ratelimit import (
    INPUT, OUTPUT, REQUESTS, MemoryBuckets, RateLimiter, capacities, duration, headers, openai_headers,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(coroutine):
    return asyncio.run(coroutine)


def test_capacities_name_only_the_limited_kinds():
    assert capacities(Limits()) == {}
    assert capacities(Limits(rpm=5, otpm=100)) == {REQUESTS: 5, OUTPUT: 100}


def test_requests_burst_to_the_limit_then_wait_for_the_refill():
    clock = Clock()
    buckets = MemoryBuckets(clock)
    caps = {REQUESTS: 3}

    async def go():
        for expected in (2, 1, 0):
            admission = await buckets.admit("k", caps)
            assert admission.admitted and admission.levels[REQUESTS] == pytest.approx(expected)
        refused = await buckets.admit("k", caps)
        assert not refused.admitted and refused.retry_after == pytest.approx(20.0)  # 1 request / (3 per 60 s)
        assert (await buckets.admit("other", caps)).admitted  # keys are counted apart
        clock.now += 20.0
        assert (await buckets.admit("k", caps)).admitted
        assert not (await buckets.admit("k", caps)).admitted
        clock.now += 3600  # never more than a minute's allowance
        levels = [(await buckets.admit("k", caps)).admitted for _ in range(4)]
        assert levels == [True, True, True, False]

    run(go())


def test_tokens_are_charged_after_the_fact_and_debt_is_waited_off():
    clock = Clock()
    buckets = MemoryBuckets(clock)
    caps = {INPUT: 600, OUTPUT: 60}

    async def go():
        assert (await buckets.admit("k", caps)).admitted
        await buckets.charge("k", caps, {INPUT: 100, OUTPUT: 90})  # 30 output tokens over
        refused = await buckets.admit("k", caps)
        assert not refused.admitted
        assert refused.levels[OUTPUT] == pytest.approx(-30) and refused.levels[INPUT] == pytest.approx(500)
        assert refused.retry_after == pytest.approx(30.0, abs=1e-3)  # 30 tokens at 1 token/s
        clock.now += 31
        assert (await buckets.admit("k", caps)).admitted

    run(go())


def test_headers_follow_anthropics_names():
    found = headers({REQUESTS: 10, INPUT: 1000}, {REQUESTS: 4.6, INPUT: -5})
    assert found["anthropic-ratelimit-requests-limit"] == "10"
    assert found["anthropic-ratelimit-requests-remaining"] == "4"
    assert found["anthropic-ratelimit-input-tokens-remaining"] == "0"
    reset = dt.datetime.fromisoformat(found["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    seconds = (reset - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 30 < seconds < 34  # 5.4 requests at 1 per 6 s
    assert not any(name.startswith("anthropic-ratelimit-output") for name in found)


def test_openai_headers_name_requests_and_the_nearest_token_limit():
    found = openai_headers({REQUESTS: 10, INPUT: 1000, OUTPUT: 100}, {REQUESTS: 4.6, INPUT: 900, OUTPUT: 25})
    assert found["x-ratelimit-limit-requests"] == "10"
    assert found["x-ratelimit-remaining-requests"] == "4"
    assert found["x-ratelimit-reset-requests"] == "32.4s"  # 5.4 requests at 1 per 6 s
    # output is nearer its end (25 %) than input (90 %): it speaks for tokens
    assert found["x-ratelimit-limit-tokens"] == "100" and found["x-ratelimit-remaining-tokens"] == "25"
    assert found["x-ratelimit-reset-tokens"] == "45s"  # output full again in 45 s, input in 6
    assert openai_headers({REQUESTS: 10}, {REQUESTS: 10.0}) == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "0ms"}
    assert "x-ratelimit-limit-requests" not in openai_headers({OUTPUT: 5}, {OUTPUT: -3})


@pytest.mark.parametrize("seconds, text", [(0.0204, "20ms"), (1, "1s"), (360, "6m0s"), (90.5, "1m30.5s"), (59.9999, "1m0s"), (-2, "0ms")])
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_the_limiter_raises_429_with_retry_after_and_counts_running_requests():
    limiter = RateLimiter(MemoryBuckets())
    limits = Limits(rpm=1, max_streams=2)

    async def go():
        found = await limiter.admit("k", limits)
        assert found["anthropic-ratelimit-requests-remaining"] == "0"
        with pytest.raises(RateLimitError) as raised:
            await limiter.admit("k", limits)
        assert int(raised.value.headers["retry-after"]) >= 59
        assert await limiter.admit("k", Limits()) == {}  # nothing limited: nothing said

    run(go())

    async def streams():
        await limiter.enter("k", limits)
        await limiter.enter("k", limits)
        with pytest.raises(RateLimitError):
            await limiter.enter("k", limits)
        await limiter.leave("k")
        await limiter.enter("k", limits)

    run(streams())


def test_a_failing_backend_lets_requests_through():
    class Down:
        async def admit(self, owner, caps):
            raise ConnectionError("down")

        async def charge(self, owner, caps, amounts):
            raise ConnectionError("down")

    limiter = RateLimiter(Down())
    assert run(limiter.admit("k", Limits(rpm=1))) == {}
    run(limiter.charge("k", Limits(otpm=1), 5, 5))


def test_redis_buckets_decide_like_memory_ones(redis_url):
    from localvl.security.redis_buckets import RedisBuckets

    async def go():
        buckets = RedisBuckets(redis_url)
        owner = "k-" + secrets.token_hex(4)
        caps = {REQUESTS: 2, OUTPUT: 60}
        try:
            assert (await buckets.admit(owner, caps)).admitted
            second = await buckets.admit(owner, caps)
            assert second.admitted and second.levels[REQUESTS] == pytest.approx(0, abs=0.01)
            refused = await buckets.admit(owner, caps)
            assert not refused.admitted and refused.retry_after == pytest.approx(30, abs=0.5)
            # A second server (another client) sees the same buckets.
            other = RedisBuckets(redis_url)
            assert not (await other.admit(owner, caps)).admitted
            await other.close()
            owner2 = owner + "-tokens"
            await buckets.charge(owner2, caps, {OUTPUT: 120})
            debt = await buckets.admit(owner2, caps)
            assert not debt.admitted and debt.levels[OUTPUT] == pytest.approx(-60, abs=0.5)
            assert debt.levels[REQUESTS] == pytest.approx(2, abs=0.01)  # a refused request takes nothing
        finally:
            await buckets.close()

    run(go())


def test_running_requests_are_counted_across_servers_sharing_redis_and_a_dead_ones_lapse(redis_url):
    from localvl.security.redis_buckets import RedisBuckets
    from localvl.security.redis_slots import RedisSlots

    async def go():
        owner, limits = "k-" + secrets.token_hex(4), Limits(max_streams=2)
        one, two = (RateLimiter(RedisBuckets(redis_url), RedisSlots(redis_url, lease_s=0.3)) for _ in range(2))
        try:
            held = await one.enter(owner, limits)
            await two.enter(owner, limits)
            with pytest.raises(RateLimitError):  # two running, one on each server: the key's limit
                await one.enter(owner, limits)
            await one.leave(owner, held)
            await one.slots.flush()
            await one.enter(owner, limits)
            await asyncio.sleep(0.6)  # past the lease: both servers renewed what they hold
            with pytest.raises(RateLimitError):
                await two.enter(owner, limits)
            await two.slots.close()  # the second server dies without giving its slot back
            await asyncio.sleep(0.6)
            await one.enter(owner, limits)  # its slot lapsed
            with pytest.raises(RateLimitError):
                await one.enter(owner, limits)
        finally:
            await one.close()
            await two.buckets.close()

    run(go())
