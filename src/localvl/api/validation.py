"""Request-body validation shared by the dialects: every problem is a 400 that says where and what."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from localvl.errors import InvalidRequestError

MAX_DEPTH = 200  # pydantic-core's JSON parser stops there
_TYPE_NOISE = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-plain"}


def _where(loc: tuple[Any, ...]) -> str:
    """A validation error location, written as the APIs write it (``messages.0.content.1.source``)."""
    parts = []
    for item in loc:
        text = str(item)
        if isinstance(item, str) and ("[" in text or text.lower() in _TYPE_NOISE):
            continue  # a union branch label, not a field
        parts.append(text)
    return ".".join(parts)


def _invalid(error: ValidationError, prefix: str = "") -> InvalidRequestError:
    errors = error.errors(include_url=False, include_input=False)
    # The deepest error is the most specific one (the others are failed union branches).
    best = max(errors, key=lambda e: len(_where(tuple(e["loc"]))))
    where = ".".join(x for x in (prefix, _where(tuple(best["loc"]))) if x)
    return InvalidRequestError(f"{where}: {best['msg']}" if where else best["msg"])


_BOM = b"\xef\xbb\xbf"  # RFC 8259 lets a parser ignore it; some Windows clients' encoders write it


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; any problem becomes a 400 that says where and what."""
    body = body.removeprefix(_BOM)
    if not body.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        errors = error.errors(include_url=False, include_input=False)
        if errors and errors[0]["type"] == "json_invalid":
            if "recursion limit" in str(errors[0].get("ctx", {}).get("error", "")):
                # valid JSON, past the parser's depth limit: saying "not valid" would send a client hunting
                raise InvalidRequestError(f"request body nests deeper than {MAX_DEPTH} levels") from None
            raise InvalidRequestError("request body is not valid JSON") from None
        if errors and errors[0]["type"] == "model_type" and not errors[0]["loc"]:
            raise InvalidRequestError("request body must be a JSON object") from None
        raise _invalid(error) from None


def load_json(text: bytes | str) -> Any:
    """Client JSON read by the parser the request models use, not ``json.loads``: a lone surrogate
    escape (which no tokenizer can encode) and nesting past its depth limit (``json.loads`` raises
    RecursionError) are invalid JSON here too, rather than a crash once the value is used.
    ``ValueError`` when it is not JSON."""
    return from_json(text)


def load_json_object(body: bytes) -> dict[str, Any]:
    """A JSON object body, not yet validated against a model; the same 400s as ``parse_body``."""
    body = body.removeprefix(_BOM)
    if not body.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        value = load_json(body)
    except ValueError:
        raise InvalidRequestError("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return value


def parse_value(model: type[BaseModel], value: Any, where: str) -> Any:
    """Validate a nested value (already parsed JSON) the same way, reporting ``where`` it sits: as
    strictly as a body, so a batch request's params (``"max_tokens": "8"``) are held to what
    ``/v1/messages`` takes."""
    try:
        return model.model_validate(value, strict=True)
    except ValidationError as error:
        raise _invalid(error, where) from None
