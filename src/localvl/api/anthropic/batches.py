"""Anthropic's Message Batches API: create, retrieve, list, cancel, delete, results (JSONL)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from localvl.api.auth import require_api_key
from localvl.api.validation import load_json_object
from localvl.errors import InvalidRequestError
from localvl.store.batches import Batch, BatchStore

router = APIRouter(dependencies=[Depends(require_api_key)])
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def batch_json(batch: Batch, request: Request) -> dict[str, Any]:
    ended = batch.ended_at is not None and batch.archived_at is None
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.processing_status,
        "request_counts": batch.counts,
        "created_at": _time(batch.created_at),
        "expires_at": _time(batch.expires_at),
        "ended_at": _time(batch.ended_at),
        "cancel_initiated_at": _time(batch.cancel_initiated_at),
        "archived_at": _time(batch.archived_at),
        "results_url": f"{str(request.base_url).rstrip('/')}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


async def _store(request: Request) -> BatchStore:
    return await request.app.state.store.batches()


@router.post("/v1/messages/batches")
async def create(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    body = load_json_object(await request.body())
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise InvalidRequestError("requests: a non-empty list of {custom_id, params} is required")
    if len(requests) > settings.batch_max_requests:
        raise InvalidRequestError(f"requests: {len(requests)} requests; at most {settings.batch_max_requests} per batch")
    seen: set[str] = set()
    rows: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(requests):
        if not isinstance(item, dict):
            raise InvalidRequestError(f"requests.{i}: expected an object with custom_id and params")
        custom_id, params = item.get("custom_id"), item.get("params")
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            raise InvalidRequestError(f"requests.{i}.custom_id: 1-64 letters, digits, '-' or '_'")
        if custom_id in seen:
            raise InvalidRequestError(f"requests.{i}.custom_id: {custom_id!r} is used more than once in this batch")
        if not isinstance(params, dict):
            raise InvalidRequestError(f"requests.{i}.params: expected an object")
        seen.add(custom_id)
        # Params are checked when each request runs, as Anthropic does: a bad one is an errored result.
        rows.append((custom_id, params))
    store = await _store(request)
    batch = await store.create(request.state.owner, rows, dt.timedelta(seconds=settings.batch_expiry))
    request.app.state.batch_worker.wake.set()
    return JSONResponse(batch_json(batch, request))


@router.get("/v1/messages/batches")
async def list_batches(
    request: Request,
    limit: int = Query(20, ge=1, le=1000),
    before_id: str | None = None,
    after_id: str | None = None,
) -> JSONResponse:
    found, more = await (await _store(request)).page(request.state.owner, limit, before_id, after_id)
    return JSONResponse({
        "data": [batch_json(b, request) for b in found],
        "first_id": found[0].id if found else None,
        "last_id": found[-1].id if found else None,
        "has_more": more,
    })


@router.get("/v1/messages/batches/{batch_id}")
async def retrieve(request: Request, batch_id: str) -> JSONResponse:
    return JSONResponse(batch_json(await (await _store(request)).get(request.state.owner, batch_id), request))


@router.post("/v1/messages/batches/{batch_id}/cancel")
async def cancel(request: Request, batch_id: str) -> JSONResponse:
    return JSONResponse(batch_json(await (await _store(request)).cancel(request.state.owner, batch_id), request))


@router.delete("/v1/messages/batches/{batch_id}")
async def delete(request: Request, batch_id: str) -> JSONResponse:
    await (await _store(request)).delete(request.state.owner, batch_id)
    return JSONResponse({"id": batch_id, "type": "message_batch_deleted"})


@router.get("/v1/messages/batches/{batch_id}/results")
async def results(request: Request, batch_id: str) -> StreamingResponse:
    store = await _store(request)
    lines = store.results(request.state.owner, batch_id)
    first = await anext(lines, b"")  # errors (not ended, unknown) surface before the response starts

    async def body() -> Any:
        yield first
        async for chunk in lines:
            yield chunk

    return StreamingResponse(body(), media_type="application/binary")
