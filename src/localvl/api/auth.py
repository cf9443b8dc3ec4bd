"""Authentication on every route: ``x-api-key`` or ``Authorization: Bearer`` (a key or a JWT).

The identity found is left in ``request.state``: ``identity``, ``owner`` (what the request's
files and batches belong to) and ``key_name`` (what the access log shows; never the key).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.requests import Request

from localvl.errors import PermissionDeniedError
from localvl.security.authenticator import Authenticator
from localvl.security.keys import ANONYMOUS


def presented_keys(request: Request) -> list[str]:
    keys = []
    if value := request.headers.get("x-api-key"):
        keys.append(value.strip())
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return keys


def addressed_to_loopback(host_header: str) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address (port aside); a
    request without one (HTTP/1.0) is no browser's."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def require_api_key(request: Request) -> None:
    """The routers' dependency: the request's identity, or ``AuthenticationError``.

    An open server (no authentication configured) listens on a loopback address, so the only
    requests it should see name that address. One naming anything else came through a name that
    resolves to the loopback address: a web page whose owner rebinds its name to 127.0.0.1 (DNS
    rebinding) is same-origin with the server and could read its files and batches, and a reverse
    proxy in front would make it public. Both get 403 unless ``--insecure-no-auth`` says so.
    """
    authenticator: Authenticator = request.app.state.authenticator
    identity = await authenticator.identify(presented_keys(request))
    if identity is ANONYMOUS and not request.app.state.settings.insecure_no_auth:
        if not addressed_to_loopback(request.headers.get("host", "")):
            raise PermissionDeniedError(
                "this server has no authentication, so it answers only requests addressed to localhost or a loopback "
                "address; configure an API key (or --insecure-no-auth) to serve it under another name"
            )
        # A page on another site cannot read the answers (no CORS headers are sent), but a plain
        # form or text POST would still make the model work for it, and batch and file routes
        # would act on its behalf. Browsers name the page's origin on such requests; SDKs send none.
        origin = request.headers.get("origin")
        where = None if origin is None else urlsplit(origin).netloc  # "null" (a sandboxed page, a file) has none
        if where is not None and not (where and addressed_to_loopback(where)):
            raise PermissionDeniedError(
                "this server has no authentication, so it answers no requests from web pages of other origins; "
                "configure an API key (or --insecure-no-auth) to serve them"
            )
    request.state.identity = identity
    request.state.owner = identity.owner
    request.state.key_name = identity.name
