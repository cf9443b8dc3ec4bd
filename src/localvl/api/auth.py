"""API keys: ``x-api-key`` or ``Authorization: Bearer``, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Sequence

from starlette.requests import Request

from localvl.errors import AuthenticationError


def presented_keys(request: Request) -> list[str]:
    keys = []
    if value := request.headers.get("x-api-key"):
        keys.append(value.strip())
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return keys


def check_api_key(request: Request, accepted: Sequence[str]) -> str:
    """The identity of the accepted key presented (a hash, never the key; "" when no keys are
    configured and the server is open); ``AuthenticationError`` otherwise."""
    if not accepted:
        return ""
    presented = presented_keys(request)
    if not presented:
        raise AuthenticationError("x-api-key header is required")
    for key in presented:
        # Compare against every accepted key so timing does not tell which one nearly matched.
        matched = False
        for candidate in accepted:
            matched |= hmac.compare_digest(key.encode(), candidate.encode())
        if matched:
            return hashlib.sha256(key.encode()).hexdigest()[:32]
    raise AuthenticationError("invalid x-api-key")


def require_api_key(request: Request) -> None:
    """The routers' dependency: the keys configured for this server, checked on every route; the
    key's identity is left in ``request.state.owner`` (what the key's files belong to)."""
    request.state.owner = check_api_key(request, request.app.state.settings.api_key)
