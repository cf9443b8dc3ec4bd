"""Authentication on every route: ``x-api-key`` or ``Authorization: Bearer`` (a key or a JWT).

The identity found is left in ``request.state``: ``identity``, ``owner`` (what the request's
files and batches belong to) and ``key_name`` (what the access log shows; never the key).
"""

from __future__ import annotations

from starlette.requests import Request

from localvl.security.authenticator import Authenticator


def presented_keys(request: Request) -> list[str]:
    keys = []
    if value := request.headers.get("x-api-key"):
        keys.append(value.strip())
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return keys


async def require_api_key(request: Request) -> None:
    """The routers' dependency: the request's identity, or ``AuthenticationError``."""
    authenticator: Authenticator = request.app.state.authenticator
    identity = await authenticator.identify(presented_keys(request))
    request.state.identity = identity
    request.state.owner = identity.owner
    request.state.key_name = identity.name
