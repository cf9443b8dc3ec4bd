"""The limits a generation request runs under: the key's rate limits and concurrent-request
count, checked before any work starts, and its tokens charged once it ends."""

from __future__ import annotations

from typing import Any, Sequence

from starlette.requests import Request

from localvl.engine.protocol import GenerationStream
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
        usage, streams = state.get("usage"), state.get("streams")
        if state.get("cache_hit"):  # a cached answer used no model time
            return
        if isinstance(usage, dict):
            # Anthropic counts cache reads apart from input tokens: they do not use up the limit.
            input_tokens = int(usage.get("input_tokens") or 0) + int(usage.get("cache_creation_input_tokens") or 0)
            await limiter.charge(identity.owner, limits, input_tokens, int(usage.get("output_tokens") or 0))
        elif streams:
            # Ended without its usage (the client left mid-answer, an error): the whole prompt and
            # what was generated, or leaving just before the end would make every answer free.
            input_tokens = max(stream.input_tokens for stream in streams)
            await limiter.charge(identity.owner, limits, input_tokens, sum(stream.generated for stream in streams))

    finishers.append(charge)


def charge_unfinished(request: Request, streams: Sequence[GenerationStream]) -> None:
    """The engine streams a request runs on, charged by what they did should it end without usage."""
    request.scope["state"]["streams"] = list(streams)
