"""Request ids on every response, and the request body size limit, as plain ASGI middleware.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and a client
disconnect still reaches the route.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localvl.api.errors import error_response
from localvl.errors import InternalError, RequestTooLargeError

logger = logging.getLogger(__name__)

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def new_id(prefix: str) -> str:
    """An id in Anthropic's style: a prefix, then ``01`` and 22 base58 characters."""
    return prefix + "01" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_request_bytes: int,
        upload_bytes: dict[str, int] | None = None,
        on_response: Callable[[Scope, int, float], None] | None = None,
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.upload_bytes = upload_bytes or {}  # paths that take uploads, and their own limit
        self.on_response = on_response  # (scope, status, seconds) once the body is sent: metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id("req_")
        scope.setdefault("state", {})["request_id"] = request_id

        started = False
        status = 500
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message)["request-id"] = request_id
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and self.on_response:
                self.on_response(scope, status, time.perf_counter() - began)

        limit = self.upload_bytes.get(scope["path"], self.max_request_bytes) if scope["method"] == "POST" else self.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            error = RequestTooLargeError(f"request body is {declared} bytes; the limit is {limit} bytes")
            await error_response(scope["path"], request_id, error)(scope, receive, send_with_id)
            return

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLargeError(f"request body exceeds the limit of {limit} bytes")
            return message

        try:
            await self.app(scope, receive_limited, send_with_id)
        except Exception as error:
            # Handled here, not re-raised: the server's own traceback logging would print the
            # exception's message, which may quote request content. Only the type is logged.
            logger.error("unhandled %s on %s %s (%s)", type(error).__name__, scope["method"], scope["path"], request_id)
            if not started:
                await error_response(scope["path"], request_id, InternalError("internal server error"))(
                    scope, receive, send_with_id
                )


def _content_length(scope: Scope) -> int | None:
    headers: Any = scope.get("headers") or []
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
