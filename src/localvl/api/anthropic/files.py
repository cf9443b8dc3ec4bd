"""Anthropic's Files API (beta ``files-api-2025-04-14``): upload once, refer to it by ``file_id``."""

from __future__ import annotations

import io
import re
from typing import Any, AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import FormData

from localvl.api.auth import require_api_key
from localvl.api.forms import form_text, read_form
from localvl.errors import InvalidRequestError, RequestTooLargeError
from localvl.media.images import sniff_media_type
from localvl.store.files import MAX_FILENAME, MAX_MIME_TYPE, FileRecord, FileStore

MULTIPART_ALLOWANCE = 1 << 20  # an upload's body is the file plus its form: boundaries, headers, fields
MAX_EXPIRES_IN = 100 * 365 * 24 * 3600
router = APIRouter(dependencies=[Depends(require_api_key)])


def metadata(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "type": "file",
        "filename": record.filename,
        "mime_type": record.mime_type,
        "size_bytes": record.size_bytes,
        "created_at": record.created_at.isoformat().replace("+00:00", "Z"),
        # Anthropic serves the content only of files its tools made; a local server serves its owner's own.
        "downloadable": True,
        "expires_at": None if record.expires_at is None else record.expires_at.isoformat().replace("+00:00", "Z"),
    }


async def _files(request: Request) -> FileStore:
    return await request.app.state.store.files()


# type/subtype, then any parameters, in printable ASCII: a part's Content-Type arrives decoded as
# latin-1 (forms.py), so anything else would be stored as mojibake.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:\s*;[\x20-\x7e]*)?")


def _is_media_type(value: str) -> bool:
    return len(value) <= MAX_MIME_TYPE and _MEDIA_TYPE.fullmatch(value) is not None


def _mime_type(declared: str | None, filename: str, head: bytes) -> str:
    sniffed = sniff_media_type(head) or ("application/pdf" if head.startswith(b"%PDF-") else None)
    if sniffed is not None:
        return sniffed
    if declared and declared != "application/octet-stream" and _is_media_type(declared):
        return declared
    if filename.lower().endswith((".txt", ".md", ".csv")):
        return "text/plain"
    return "application/octet-stream"


@router.post("/v1/files")
async def upload(request: Request) -> JSONResponse:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("upload a file as multipart/form-data with a 'file' field")
    limit = request.app.state.settings.max_file_bytes
    form = await read_form(request, limit)
    try:
        return await _store_upload(request, form, limit)
    finally:
        await form.close()  # its spooled files (Request.form would have closed them with the request)


async def _store_upload(request: Request, form: FormData, limit: int) -> JSONResponse:
    upload = form.get("file")
    if upload is None:
        raise InvalidRequestError("file: Field required")
    if isinstance(upload, str):  # bare bytes, sent without a filename
        content, filename, declared = io.BytesIO(upload.encode("latin-1")), "upload", None
        size: int | None = len(upload)
    else:
        content, filename, declared, size = upload.file, form_text(upload.filename or "") or "upload", upload.content_type, upload.size
        if len(filename) > MAX_FILENAME:
            raise InvalidRequestError(f"file: the filename may be at most {MAX_FILENAME} characters; it has {len(filename)}")
        if "\x00" in filename:
            raise InvalidRequestError("file: the filename may not contain a NUL character")
    if size is not None and size > limit:  # the body's limit allows for the form around it
        raise RequestTooLargeError(f"file is {size} bytes; the limit is {limit} bytes")
    head = content.read(16)
    content.seek(0)
    mime = _mime_type(declared, filename, head)
    expires = form.get("expires_in_seconds")
    expires_in = None
    if isinstance(expires, str) and expires:
        try:
            expires_in = float(expires)
        except ValueError:
            raise InvalidRequestError("expires_in_seconds: must be a number") from None
        if not 0 < expires_in <= MAX_EXPIRES_IN:  # (nan fails this too; past ~8,000 years a date overflows)
            raise InvalidRequestError(f"expires_in_seconds: must be greater than 0 and at most {MAX_EXPIRES_IN} (100 years)")
    record = await (await _files(request)).create(request.state.owner, filename, mime, content, expires_in)
    if record.size_bytes == 0:
        await (await _files(request)).delete(request.state.owner, record.id)
        raise InvalidRequestError("file: the file is empty")
    return JSONResponse(metadata(record))


@router.get("/v1/files")
async def list_files(
    request: Request,
    limit: int = Query(20, ge=1, le=1000),
    page: str | None = None,
    before_id: str | None = None,
    after_id: str | None = None,
) -> JSONResponse:
    """Newest first. Paged by the opaque ``page`` cursor (``next_page``), or by ``after_id`` /
    ``before_id`` as older clients page; ``ids`` asks for just those files, in one page."""
    query = request.query_params
    ids = query.getlist("ids[]") + query.getlist("ids") or None  # the SDK writes ids[]=a&ids[]=b
    if ids is not None and (page is not None or "limit" in query):
        raise InvalidRequestError("ids: mutually exclusive with page and limit")
    if ids is not None and len(set(ids)) > 100:
        raise InvalidRequestError("ids: at most 100 entries")
    if page is not None:
        after_id = page  # the cursor is the id of the last file of the page before
    store = await _files(request)
    records, more = await store.page(request.state.owner, 100 if ids else limit, before_id, after_id, ids)
    return JSONResponse({
        "data": [metadata(r) for r in records],
        "next_page": records[-1].id if more and records and ids is None else None,
        "first_id": records[0].id if records else None,
        "last_id": records[-1].id if records else None,
        "has_more": more,
    })


@router.get("/v1/files/{file_id}")
async def retrieve(request: Request, file_id: str) -> JSONResponse:
    return JSONResponse(metadata(await (await _files(request)).get(request.state.owner, file_id)))


@router.get("/v1/files/{file_id}/content")
async def content(request: Request, file_id: str) -> StreamingResponse:
    store = await _files(request)
    record = await store.get(request.state.owner, file_id)
    pieces = store.content(record)
    first = await anext(pieces, b"")  # bytes missing: a 404 before the response starts

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for piece in pieces:
            yield piece

    # The length lets a client tell a download cut short (the file deleted mid-way) from a whole one.
    headers = {"content-length": str(record.size_bytes), "content-disposition": _disposition(record.filename)}
    return StreamingResponse(body(), media_type=record.mime_type, headers=headers)


def _disposition(filename: str) -> str:
    """RFC 6266: the name as RFC 5987's ``filename*`` (whose value may hold no "/", which ``quote``
    keeps by default), after a plain ``filename`` fallback for clients that read only that."""
    encoded = quote(filename, safe="")
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    if encoded == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


@router.delete("/v1/files/{file_id}")
async def delete(request: Request, file_id: str) -> JSONResponse:
    await (await _files(request)).delete(request.state.owner, file_id)
    return JSONResponse({"id": file_id, "type": "file_deleted"})
