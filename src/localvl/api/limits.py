"""The limits a generation request runs under: the key's rate limits and concurrent-request
count, checked before any work starts, and its tokens charged once it ends."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from localvl.security.keys import Identity
from localvl.security.ratelimit import HeaderStyle, RateLimiter, headers, openai_headers


async def rate_limited(request: Request) -> None:
    """A dependency for the generation routes (after authentication), telling where the key
    stands in Anthropic's headers (``anthropic-ratelimit-*``)."""
    await _limit(request, headers)


async def openai_rate_limited(request: Request) -> None:
    """``rate_limited``, telling it in OpenAI's headers (``x-ratelimit-*``)."""
    await _limit(request, openai_headers)


async def _limit(request: Request, style: HeaderStyle) -> None:
    limiter: RateLimiter = request.app.state.limiter
    identity: Identity = request.state.identity
    limits = identity.limits
    state: dict[str, Any] = request.scope["state"]
    slot = await limiter.enter(identity.owner, limits)  # raises beyond max_streams
    finishers = state.setdefault("finishers", [])

    async def leave() -> None:
        await limiter.leave(identity.owner, slot)

    finishers.append(leave)
    state.setdefault("response_headers", {}).update(await limiter.admit(identity.owner, limits, style))

    async def charge() -> None:
        usage = state.get("usage")
        if isinstance(usage, dict) and not state.get("cache_hit"):  # a cached answer used no model time
            # Anthropic counts cache reads apart from input tokens: they do not use up the limit.
            input_tokens = int(usage.get("input_tokens") or 0) + int(usage.get("cache_creation_input_tokens") or 0)
            await limiter.charge(identity.owner, limits, input_tokens, int(usage.get("output_tokens") or 0))

    finishers.append(charge)
