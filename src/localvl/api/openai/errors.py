"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re
from typing import Any

from localvl.errors import ContextLengthError, LocalvlError

# localvl's error kinds (Anthropic's vocabulary) in the words OpenAI's API uses.
TYPES = {
    "invalid_request_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "not_found_error": "invalid_request_error",
    "authentication_error": "invalid_request_error",
    "permission_error": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
    "overloaded_error": "server_error",
    "api_error": "server_error",
}
CODES = {
    "authentication_error": "invalid_api_key",
    "rate_limit_error": "rate_limit_exceeded",
    "overloaded_error": "overloaded",
    "timeout_error": "timeout",
}


# A 400's message names the field it is about first ("temperature: ...", "messages.0.content: ..."):
# OpenAI's ``param``.
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ")


def error_json(error: LocalvlError) -> dict[str, Any]:
    if isinstance(error, ContextLengthError):
        message = error.message
        if error.tokens is not None and error.limit is not None:  # OpenAI's sentence: clients read the numbers from it
            message = (f"This model's maximum context length is {error.limit} tokens. However, your messages resulted in "
                       f"{error.tokens} tokens. Please reduce the length of the messages.")
        return {"message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}
    field = _FIELD.match(error.message) if error.kind in ("invalid_request_error", "not_found_error") else None
    code = CODES.get(error.kind)
    if error.kind == "not_found_error":  # a model that is not served, or a path that is no endpoint
        code, field = ("model_not_found" if field and field.group(1) == "model" else None), None
    message = error.message
    if code == "model_not_found":  # in OpenAI's words, which clients and people searching an error know
        message = f"The model `{message.removeprefix('model: ')}` does not exist or you do not have access to it."
    if error.kind == "authentication_error":  # the shared message names Anthropic's header
        message = "Incorrect API key provided." if "invalid" in message else "You didn't provide an API key (Authorization: Bearer)."
    return {
        "message": message,
        "type": TYPES.get(error.kind, "server_error"),
        "param": field.group(1) if field else None,
        "code": code,
    }


def error_body(error: LocalvlError, request_id: str) -> dict[str, Any]:
    return {"error": error_json(error)}
