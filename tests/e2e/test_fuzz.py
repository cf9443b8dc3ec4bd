"""Fuzzing the HTTP surface: schemathesis cases generated from the request models (valid and
invalid ones), and a hand-made corpus of hostile bodies. Whatever arrives, the answer is never a
5xx (a 504 is the server's own time limit, set short here) and always the dialect's error envelope."""

from __future__ import annotations

import base64
import gzip
import io
import json

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from pydantic.json_schema import models_json_schema  # noqa: E402

from localvl.api.anthropic.schemas import CountTokensRequest, MessagesRequest  # noqa: E402
from localvl.api.openai.schemas import ChatCompletionRequest  # noqa: E402
from tests.e2e.conftest import API_KEY, Server  # noqa: E402
from tests.helpers import image_b64  # noqa: E402

EXAMPLES = 60  # per operation and mode
COUNTED: dict[str, int] = {}


def openapi() -> dict:
    _, defs = models_json_schema(
        [(MessagesRequest, "validation"), (CountTokensRequest, "validation"), (ChatCompletionRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = defs["$defs"]
    for name in ("MessagesRequest", "CountTokensRequest", "ChatCompletionRequest"):
        # Served names, so valid cases reach the engine rather than stopping at "no such model".
        schemas[name]["properties"]["model"] = {"enum": ["tiny-vl", "claude-sonnet-4-5"]}

    def body(name: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    def query(*names: str) -> list[dict]:
        return [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in names]

    def path(name: str) -> list[dict]:
        return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]

    ok = {"default": {"description": "any"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "localvl", "version": "1"},
        "paths": {
            "/v1/messages": {"post": {"requestBody": body("MessagesRequest"), "responses": ok}},
            "/v1/messages/count_tokens": {"post": {"requestBody": body("CountTokensRequest"), "responses": ok}},
            "/v1/chat/completions": {"post": {"requestBody": body("ChatCompletionRequest"), "responses": ok}},
            "/v1/models": {"get": {"parameters": query("limit", "after_id", "before_id"), "responses": ok}},
            "/v1/models/{model_id}": {"get": {"parameters": path("model_id"), "responses": ok}},
            "/v1/files": {"get": {"parameters": query("limit", "after_id", "before_id"), "responses": ok}},
            "/v1/files/{file_id}": {"get": {"parameters": path("file_id"), "responses": ok},
                                   "delete": {"parameters": path("file_id"), "responses": ok}},
            "/v1/messages/batches": {"get": {"parameters": query("limit", "after_id", "before_id"), "responses": ok}},
            "/v1/messages/batches/{batch_id}": {"get": {"parameters": path("batch_id"), "responses": ok}},
        },
        "components": {"schemas": schemas},
    }


SCHEMA = schemathesis.openapi.from_dict(openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    # A short time limit: generated requests may ask for thousands of tokens.
    s = Server(model_dir("qwen2_5_vl"), tmp_path_factory.mktemp("logs") / "fuzz.log", "--request-timeout", "2",
               "--max-request-bytes", str(4 << 20))
    yield s
    s.stop()
    total = sum(COUNTED.values())
    print(f"\nfuzzing: {total} generated cases " + ", ".join(f"{k}: {v}" for k, v in sorted(COUNTED.items())))


def _header(response: object, name: str) -> str:
    value = response.headers.get(name, "")  # type: ignore[attr-defined]
    return value[0] if isinstance(value, list) else value  # schemathesis keeps a list per header


def check(response: httpx.Response | object, path: str) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    assert status < 500 or status == 504, (status, response.text[:300])  # type: ignore[attr-defined]
    request_id = _header(response, "request-id")
    assert request_id.startswith("req_")
    if status >= 400:
        payload = response.json()  # type: ignore[attr-defined]
        if path.startswith("/v1/chat/"):
            assert set(payload) == {"error"} and isinstance(payload["error"]["message"], str)
        else:
            assert payload["type"] == "error" and payload["error"]["type"] and payload["error"]["message"]
            assert payload["request_id"] == request_id


# Invalid cases need something to break: a body or query parameters (any string is a valid path id).
CASES = [(op, mode) for op in OPERATIONS for mode in ("positive", "negative")
         if mode == "positive" or op.body or op.query]


@pytest.mark.parametrize("operation, mode", CASES, ids=[f"{op.label} {mode}" for op, mode in CASES])
def test_generated_requests_get_no_5xx_and_the_envelope(fuzz_server, operation, mode):
    from schemathesis import GenerationMode

    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @given(strategy)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(base_url=fuzz_server.url, headers={"x-api-key": API_KEY}, timeout=30)
        check(response, operation.path)
        COUNTED[f"{operation.label} {mode}"] = COUNTED.get(f"{operation.label} {mode}", 0) + 1

    run()


def _png_bomb() -> str:
    """A valid PNG header declaring 100,000 × 100,000 pixels: decoding it would take 30 GB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def _deep(depth: int) -> bytes:
    return b'{"model":"tiny-vl","max_tokens":5,"messages":' + b"[" * depth + b"]" * depth + b"}"


def _image_message(data: str, media_type: str = "image/png") -> dict:
    return {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}]}


VALID = {"model": "tiny-vl", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def corpus() -> list[tuple[str, bytes, dict]]:
    """(name, body, extra headers) of hostile requests for /v1/messages."""
    cases: list[tuple[str, bytes, dict]] = []

    def add(name: str, value: object, **headers: str) -> None:
        cases.append((name, value if isinstance(value, bytes) else json.dumps(value).encode(), headers))

    add("deep nesting", _deep(100_000))
    add("deep content", b'{"model":"tiny-vl","max_tokens":5,"messages":[{"role":"user","content":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}]}")
    add("huge integer", b'{"model":"tiny-vl","max_tokens":' + b"9" * 5000 + b',"messages":[]}')
    add("float max_tokens", {**VALID, "max_tokens": 1e308})
    add("NaN temperature", b'{"model":"tiny-vl","max_tokens":5,"temperature":NaN,"messages":[{"role":"user","content":"hi"}]}')
    add("Infinity top_p", b'{"model":"tiny-vl","max_tokens":5,"top_p":Infinity,"messages":[{"role":"user","content":"hi"}]}')
    add("lone surrogate", b'{"model":"tiny-vl","max_tokens":5,"messages":[{"role":"user","content":"\\ud800"}]}')
    add("invalid utf-8", b'{"model":"tiny-vl","max_tokens":5,"messages":[{"role":"user","content":"\xff\xfe"}]}')
    add("empty body", b"")
    add("null", b"null")
    add("array", b"[]")
    add("string", b'"hello"')
    add("truncated json", json.dumps(VALID).encode()[:-7])
    add("duplicate keys", b'{"model":"tiny-vl","max_tokens":5,"max_tokens":"x","messages":[]}')
    add("gzip body", gzip.compress(json.dumps(VALID).encode()), **{"content-encoding": "gzip"})
    add("truncated base64", {**VALID, "messages": [_image_message(image_b64()[:-5])]})
    add("base64 of nothing", {**VALID, "messages": [_image_message("")]})
    add("not base64", {**VALID, "messages": [_image_message("%%%%not-base64%%%%")]})
    add("wrong media type", {**VALID, "messages": [_image_message(image_b64(), "image/jpeg")]})
    add("png bomb", {**VALID, "messages": [_image_message(_png_bomb())]})
    add("pdf garbage", {**VALID, "messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": base64.b64encode(b"%PDF-1.7\n" + b"\x00" * 100).decode()}}]}]})
    add("10k content blocks", {**VALID, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 10_000}]})
    for item in (None, "a", 5):  # a content document's items that are no blocks
        add(f"document content item {item!r}", {**VALID, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "content", "content": [item]}}]}]})
    add("unknown block type", {**VALID, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]})
    add("tool with bad schema", {**VALID, "tools": [{"name": "t", "input_schema": {"type": "object", "properties": 5}}], "tool_choice": {"type": "any"}})
    add("tool schema recursion", {**VALID, "tools": [{"name": "t", "input_schema": {"$ref": "#"}}], "tool_choice": {"type": "any"}})
    add("stop sequences wrong", {**VALID, "stop_sequences": [[["x"]]]})
    add("negative budget", {**VALID, "thinking": {"type": "enabled", "budget_tokens": -1}})
    # Every top-level field of a valid request with every wrong type.
    for field in ("model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "stream", "tools",
                  "tool_choice", "thinking", "metadata", "stop_sequences"):
        for wrong in (None, True, -1, 3.5, "x", [], {}, [None], {"": None}):
            add(f"{field}={wrong!r}", {**VALID, field: wrong})
    return cases


CORPUS = corpus()


def test_hostile_bodies_get_the_envelope(fuzz_server):
    client = httpx.Client(base_url=fuzz_server.url, headers={"x-api-key": API_KEY}, timeout=60)
    failures = []
    for name, body, headers in CORPUS:
        for path in ("/v1/messages", "/v1/chat/completions"):
            response = client.post(path, content=body, headers={"content-type": "application/json", **headers})
            try:
                check(response, path)
            except AssertionError as error:
                failures.append(f"{name} on {path}: {error}")
    assert not failures, "\n".join(failures)
    assert client.get("/health").status_code == 200  # still alive
    COUNTED["hand-made corpus"] = 2 * len(CORPUS)
