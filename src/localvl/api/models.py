"""``GET /v1/models``: one response both official SDKs read.

Anthropic's SDK reads ``{data, has_more, first_id, last_id}`` with ``{type: "model", id,
display_name, created_at}`` entries; OpenAI's reads ``{object: "list", data}`` with ``{id, object:
"model", created, owned_by}``. Each ignores the other's fields, so every answer carries both.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any

from fastapi import APIRouter, Depends, Request

from localvl.api.auth import require_api_key
from localvl.api.model_names import ModelNames, ServedModel
from localvl.errors import InvalidRequestError


router = APIRouter(dependencies=[Depends(require_api_key)])


def _names(request: Request) -> ModelNames:
    return request.app.state.model_names


def model_json(model_id: str, served: ServedModel) -> dict[str, Any]:
    created = served.created_at.astimezone(timezone.utc)
    return {
        "type": "model",
        "object": "model",
        "id": model_id,
        "display_name": served.name if model_id == served.name else f"{model_id} (served by {served.name})",
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "created": int(created.timestamp()),
        "owned_by": "localvl",
        "lifecycle": "active",
        "max_input_tokens": served.context_length,
        "max_tokens": served.context_length,
    }


@router.get("/v1/models")
async def list_models(
    request: Request, limit: int = 20, after_id: str | None = None, before_id: str | None = None
) -> Any:
    if not 1 <= limit <= 1000:
        raise InvalidRequestError("limit: must be between 1 and 1000")
    entries = _names(request).listed()
    ids = [model_id for model_id, _ in entries]
    for cursor in (after_id, before_id):
        if cursor is not None and cursor not in ids:
            raise InvalidRequestError(f"unknown model id in pagination cursor: {cursor}")
    if after_id is not None:
        window = entries[ids.index(after_id) + 1 :]
        page, has_more = window[:limit], len(window) > limit
    elif before_id is not None:
        window = entries[: ids.index(before_id)]
        page, has_more = window[-limit:], len(window) > limit
    else:
        page, has_more = entries[:limit], len(entries) > limit
    data = [model_json(model_id, served) for model_id, served in page]
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Any:
    return model_json(model_id, _names(request).require(model_id))
