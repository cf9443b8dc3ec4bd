"""Anthropic's error envelope."""

from __future__ import annotations

from typing import Any

from localvl.errors import LocalvlError


def error_body(error: LocalvlError, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error.kind, "message": error.message}, "request_id": request_id}


def error_event(error: LocalvlError) -> dict[str, Any]:
    """The ``error`` SSE event for a failure after the stream began."""
    return {"type": "error", "error": {"type": error.kind, "message": error.message}}
