"""Multipart forms read so that every byte of a part survives, filename or not."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from localvl.errors import InvalidRequestError


async def read_form(request: Request, max_part_size: int) -> FormData:
    """The request's multipart form, its parts decoded as latin-1 (``form_text`` undoes it for text).

    Clients send bytes given without a filename (the SDKs' ``file=b"..."``, curl's ``-F x=<file``)
    as a part with no filename, which the form parser hands back as text: decoded as UTF-8 where the
    bytes allow, and then no longer telling which bytes they were. Latin-1 is the one decoding that
    keeps every byte.
    """
    content_type = re.sub(r";\s*charset=[^;]*", "", request.headers["content-type"], flags=re.IGNORECASE)
    parser = MultiPartParser(Headers({"content-type": f"{content_type}; charset=latin-1"}), request.stream(),
                             max_part_size=max_part_size)
    try:
        return await parser.parse()
    except MultiPartException as error:
        raise InvalidRequestError(error.message) from None


async def read_urlencoded(request: Request, max_fields: int = 1000) -> FormData:
    """An urlencoded form, its names and values decoded as latin-1 as ``read_form``'s parts are.

    Clients percent-encode UTF-8 (browsers, ``curl --data-urlencode``) or send it raw (``curl -d
    "prompt=你好"``); the stock parser decodes escapes as UTF-8 but raw bytes as latin-1, so raw
    Chinese came out as mojibake. Latin-1 for both keeps the bytes, which ``form_text`` reads.
    """
    body = (await request.body()).decode("latin-1")
    try:
        return FormData(parse_qsl(body, keep_blank_values=True, encoding="latin-1", max_num_fields=max_fields))
    except ValueError:  # past max_fields
        raise InvalidRequestError(f"form: at most {max_fields} fields are accepted") from None


def form_text(value: str) -> str:
    """A latin-1-decoded field as the form parser would have given it: UTF-8 where it is UTF-8."""
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return value


async def form_bytes(part: UploadFile | str) -> bytes:
    """A part's bytes, whether it came as a file or (without a filename) as a field."""
    if isinstance(part, str):
        return part.encode("latin-1")
    return await part.read()
