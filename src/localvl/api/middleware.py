"""Request ids on every response, the request body size limit, refusal while draining, and the
end-of-request hooks, as plain ASGI middleware.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and a client
disconnect still reaches the route.

Routes talk to it through ``scope["state"]``: ``response_headers`` are added to the response
(rate-limit headers), and ``finishers`` (async callables) run once the request is over, however
it ended (a rate-limit slot is given back, tokens are charged).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localvl.api.errors import error_response
from localvl.errors import InternalError, RequestTimeoutError, RequestTooLargeError, ServiceUnavailableError

logger = logging.getLogger(__name__)

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def new_id(prefix: str) -> str:
    """An id in Anthropic's style: a prefix, then ``01`` and 22 base58 characters (128 random
    bits, read from the OS once rather than once per character)."""
    value = int.from_bytes(secrets.token_bytes(16), "big")
    chars = []
    for _ in range(22):
        value, digit = divmod(value, 58)
        chars.append(_ALPHABET[digit])
    return prefix + "01" + "".join(chars)


class Traffic:
    """Requests being answered, and whether the server is draining: shared by the middleware and
    the shutdown that waits for the requests to end."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_request_bytes: int,
        upload_bytes: dict[str, int] | None = None,
        on_response: Callable[[Scope, int, float], Awaitable[None]] | None = None,
        traffic: Traffic | None = None,
        always_open: tuple[str, ...] = ("/health", "/ready", "/metrics"),
        body_timeout: float = 60.0,
    ) -> None:
        self.app = app
        # Seconds a client may pause mid-body (nginx's client_body_timeout): every route's body,
        # uploads and count_tokens included, so a withheld body cannot hold a connection forever.
        self.body_timeout = body_timeout
        self.max_request_bytes = max_request_bytes
        self.upload_bytes = upload_bytes or {}  # paths that take uploads, and their own limit
        self.on_response = on_response  # (scope, status, seconds) once the request is over: metrics, access log
        self.traffic = traffic or Traffic()
        self.always_open = always_open  # answered while draining: probes and scrapes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id("req_")
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        if self.traffic.draining and scope["path"] not in self.always_open:
            # Shutting down: say so (clients retry, elsewhere or later) instead of starting work.
            error = ServiceUnavailableError("the server is shutting down", headers={"retry-after": "5"})

            async def send_refusal(message: Message) -> None:
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message)["request-id"] = request_id
                await send(message)

            await error_response(scope["path"], request_id, error)(scope, receive, send_refusal)
            return
        self.traffic.enter()
        began = time.perf_counter()
        outcome = {"status": 499, "started": False}  # 499: the client left before an answer began
        try:
            await self._answer(scope, receive, send, request_id, state, outcome)
        finally:
            for finisher in state.get("finishers", ()):
                try:
                    await finisher()
                except Exception as error:
                    logger.error("a request's end hook failed: %s (%s)", type(error).__name__, request_id)
            if self.on_response is not None:
                await self.on_response(scope, outcome["status"], time.perf_counter() - began)
            self.traffic.leave()

    async def _answer(self, scope: Scope, receive: Receive, send: Send, request_id: str, state: dict[str, Any],
                      outcome: dict[str, Any]) -> None:
        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["started"] = True
                outcome["status"] = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in state.get("response_headers", {}).items():
                    if name not in headers:
                        headers[name] = value
                headers["request-id"] = request_id
                headers["x-request-id"] = request_id  # the name OpenAI's SDK reads (``_request_id``)
            await send(message)

        limit = self.upload_bytes.get(scope["path"], self.max_request_bytes) if scope["method"] == "POST" else self.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            error = RequestTooLargeError(f"request body is {declared} bytes; the limit is {limit} bytes")
            await error_response(scope["path"], request_id, error)(scope, receive, send_with_id)
            return

        received = 0
        body_done = False

        async def receive_limited() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive only tells of a disconnect: as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"the request body stalled for {self.body_timeout:g} seconds") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise RequestTooLargeError(f"request body exceeds the limit of {limit} bytes")
            return message

        try:
            await self.app(scope, receive_limited, send_with_id)
        except ClientDisconnect:  # the client left (mid-body, or before its answer): not a server error
            logger.info("the client left before its answer on %s %s (%s)", scope["method"], _route(scope), request_id)
        except Exception as error:
            # Handled here, not re-raised: the server's own traceback logging would print the
            # exception's message, which may quote request content. Only the type is logged.
            logger.error("unhandled %s on %s %s (%s)", type(error).__name__, scope["method"], _route(scope), request_id)
            if not outcome["started"]:
                await error_response(scope["path"], request_id, InternalError("internal server error"))(
                    scope, receive, send_with_id
                )


def _route(scope: Scope) -> str:
    """The route template, as the access log writes it: the path itself holds file and batch ids,
    and is percent-decoded (a ``%0a`` in it would forge a log line)."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


def _content_length(scope: Scope) -> int | None:
    headers: Any = scope.get("headers") or []
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
