"""Anthropic's error envelope."""

from __future__ import annotations

from typing import Any

from localvl.errors import LocalvlError


def _error(error: LocalvlError) -> dict[str, Any]:
    body: dict[str, Any] = {"type": error.kind, "message": error.message}
    if error.code is not None:
        body["details"] = {"error_code": error.code}
    return body


def error_body(error: LocalvlError, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": _error(error), "request_id": request_id}


def error_event(error: LocalvlError) -> dict[str, Any]:
    """The ``error`` SSE event for a failure after the stream began."""
    return {"type": "error", "error": _error(error)}
