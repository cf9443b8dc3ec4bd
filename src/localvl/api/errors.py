"""Every error leaves the server in the envelope of the API dialect its route belongs to."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from localvl.api.anthropic.errors import error_body as anthropic_error_body
from localvl.api.openai.errors import error_body as openai_error_body
from localvl.errors import InvalidRequestError, LocalvlError, status_error

Envelope = Callable[[LocalvlError, str], dict[str, Any]]
# (path prefix, envelope); the first match wins, Anthropic's is the default.
ENVELOPES: list[tuple[str, Envelope]] = [("/v1/chat/", openai_error_body)]


def envelope_for(path: str, headers: Any = None, *, no_route: bool = False) -> Envelope:
    """``headers``: the request's, where known. /v1/models serves both SDKs, and a path that is no
    route (``no_route``) belongs to neither: there a request with a Bearer key and no
    anthropic-version header is the OpenAI SDK's (the Anthropic SDKs always send the version), and
    gets OpenAI's envelope."""
    for prefix, envelope in ENVELOPES:
        if path.startswith(prefix):
            return envelope
    if (no_route or path.startswith("/v1/models")) and headers is not None and "anthropic-version" not in headers \
            and headers.get("authorization", "").lower().startswith("bearer "):
        return openai_error_body
    return anthropic_error_body


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def error_response(path: str, request_id: str, error: LocalvlError, headers: Any = None, *, no_route: bool = False) -> JSONResponse:
    body = envelope_for(path, headers, no_route=no_route)(error, request_id)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_localvl_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, LocalvlError)
        return error_response(request.url.path, request_id_of(request), error, request.headers)

    async def on_http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 404:
            message = f"{request.method} {request.url.path} is not an endpoint of this server"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        no_route = error.status_code in (404, 405)
        return error_response(request.url.path, request_id_of(request), status_error(error.status_code, message), request.headers,
                              no_route=no_route)

    async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return error_response(request.url.path, request_id_of(request), InvalidRequestError(message), request.headers)

    app.add_exception_handler(LocalvlError, on_localvl_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
