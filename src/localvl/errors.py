"""One error hierarchy for everything a request can run into.

Any layer (dialect conversion, media decoding, prompt rendering, the engine) raises these; each
API dialect maps them onto its own error envelope. ``kind`` names the error in the words of
Anthropic's API, which has the finest-grained vocabulary of the dialects localvl speaks.
"""

from __future__ import annotations


class LocalvlError(Exception):
    """An error whose message is safe to show the client (it never echoes request content)."""

    status: int = 500
    kind: str = "api_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.code = code  # a finer cause a client branches on (Anthropic's ``error.details.error_code``)


class InvalidRequestError(LocalvlError):
    status = 400
    kind = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit the model's context (Anthropic's ``prompt is too long`` 400, which
    OpenAI's API calls ``context_length_exceeded``: clients branch on both). ``tokens`` and
    ``limit``, where known, let each dialect say it in its API's own sentence, which clients parse."""

    def __init__(self, message: str, *, tokens: int | None = None, limit: int | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.tokens = tokens
        self.limit = limit


class AuthenticationError(LocalvlError):
    status = 401
    kind = "authentication_error"


class PermissionDeniedError(LocalvlError):
    status = 403
    kind = "permission_error"


class NotFoundError(LocalvlError):
    status = 404
    kind = "not_found_error"


class MethodNotAllowedError(LocalvlError):
    status = 405
    kind = "invalid_request_error"


class RequestTooLargeError(LocalvlError):
    status = 413
    kind = "request_too_large"


class RateLimitError(LocalvlError):
    status = 429
    kind = "rate_limit_error"


class InternalError(LocalvlError):
    status = 500
    kind = "api_error"


class EngineDiedError(InternalError):
    """The engine process died with this request in flight: the server failed, not the request.

    Clients see the 500 any internal failure is; work the server repeats on its own (a batch
    request) is given back and done again rather than recorded as failed.
    """


class OverloadedError(LocalvlError):
    status = 529
    kind = "overloaded_error"


class ServiceUnavailableError(LocalvlError):
    status = 503
    kind = "overloaded_error"


class RequestTimeoutError(LocalvlError):
    status = 504
    kind = "timeout_error"


_BY_STATUS: dict[int, type[LocalvlError]] = {
    cls.status: cls
    for cls in (
        InvalidRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        MethodNotAllowedError,
        RequestTooLargeError,
        RateLimitError,
        OverloadedError,
        ServiceUnavailableError,
        RequestTimeoutError,
    )
}


def status_error(status: int, message: str) -> LocalvlError:
    """The hierarchy's error for a bare HTTP status (from routing, say)."""
    if status in _BY_STATUS:
        return _BY_STATUS[status](message)
    error: LocalvlError = InvalidRequestError(message) if 400 <= status < 500 else InternalError(message)
    error.status = status if 400 <= status < 500 else 500
    return error
