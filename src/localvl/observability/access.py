"""The access log: one JSON line per request, made only of facts about it, never of its content.

Fields: request id, method, route template (never the path: ids and query strings stay out),
status, milliseconds, the key's name (a stored key's name, ``static-`` and a hash prefix for a
key given by flag, ``jwt:`` and the subject for a token; never the key), the served model's name,
the token counts of a Message, and whether the response cache answered. Logged under ``localvl.access`` at INFO.
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger("localvl.access")

USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def log_access(scope: Any, route: str, status: int, seconds: float) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    state = scope.get("state") or {}
    line: dict[str, Any] = {
        "request_id": state.get("request_id"),
        "method": scope.get("method"),
        "route": route,
        "status": status,
        "ms": round(seconds * 1000, 1),
    }
    if state.get("key_name"):
        line["key"] = state["key_name"]
    if state.get("model"):
        line["model"] = state["model"]
    usage = state.get("usage")
    if isinstance(usage, dict):
        line.update({name: usage[name] for name in USAGE_FIELDS if isinstance(usage.get(name), int)})
    if state.get("cache_hit"):
        line["response_cache"] = "hit"
    logger.info(json.dumps(line, separators=(",", ":")))
