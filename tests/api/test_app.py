"""The HTTP surface in process: envelopes, request ids, auth, limits, the multipart form."""

import json

import pytest
from fastapi.testclient import TestClient

from localvl.api.app import create_app
from localvl.engine.local import LocalEngine
from localvl.settings import Settings
from tests.helpers import image_b64, image_bytes, prompt_tokens
from tests.store.conftest import database_url  # noqa: F401  (a fixture: SQLite, and PostgreSQL where there is one)

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def client(loaded_model, tmp_path_factory):
    settings = Settings(api_key=[KEY, "second-key"], max_request_bytes=64 * 1024, served_model_name="tiny-vl",
                        alias=["claude-*", "gpt-4o=tiny-vl"], data_dir=tmp_path_factory.mktemp("data"))
    app = create_app(settings, LocalEngine(loaded_model("qwen2_5_vl")))
    with TestClient(app, headers={"x-api-key": KEY}) as test_client:
        yield test_client


def body(**overrides):
    payload = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}
    payload.update(overrides)
    return payload


def assert_error(response, status, kind):
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == kind
    assert payload["error"]["message"]
    assert payload["request_id"] == response.headers["request-id"] and payload["request_id"].startswith("req_")
    return payload["error"]["message"]


def test_health_is_open_and_every_response_has_a_request_id(client):
    response = client.get("/health", headers={"x-api-key": ""})
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert response.headers["request-id"].startswith("req_")
    ok = client.post("/v1/messages", json=body())
    assert ok.status_code == 200 and ok.headers["request-id"] != response.headers["request-id"]


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": KEY}, {"x-api-key": "", "authorization": f"Bearer {KEY}"}, {"x-api-key": "second-key"}],
)
def test_either_header_authenticates(client, headers):
    assert client.post("/v1/messages/count_tokens", json=body(), headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [{"x-api-key": ""}, {"x-api-key": "wrong"}, {"x-api-key": "", "authorization": "Bearer nope"}])
def test_missing_or_wrong_keys_are_401(client, headers):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert_error(client.post(path, json=body(), headers=headers), 401, "authentication_error")
    models = client.get("/v1/models", headers=headers)
    if "authorization" in headers:  # a Bearer key without anthropic-version: the OpenAI SDK's request
        assert models.status_code == 401 and models.json()["error"]["code"] == "invalid_api_key"
    else:
        assert_error(models, 401, "authentication_error")
    assert_error(client.get("/v1/models", headers={**headers, "anthropic-version": "2023-06-01"}), 401, "authentication_error")


def test_routing_errors_use_the_envelope(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found_error")
    assert_error(client.delete("/v1/messages"), 405, "invalid_request_error")
    message = assert_error(client.get("/v1/models", params={"limit": "many"}), 400, "invalid_request_error")
    assert message.startswith("limit")  # framework validation (a 422 by default) is a 400 here


def test_body_over_the_limit_is_413(client):
    big = body(messages=[{"role": "user", "content": "x" * 70_000}])
    assert_error(client.post("/v1/messages", json=big), 413, "request_too_large")

    def chunks():  # no content-length: counted while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    response = client.post("/v1/messages", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "request_too_large")


@pytest.mark.parametrize(
    "payload, where",
    [
        (body(messages=[]), "messages"),
        (body(max_tokens=-1), "max_tokens"),
        (body(max_tokens="8"), "max_tokens"),
        ({"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        (body(messages=[{"role": "assistant", "content": "hi"}]), "messages"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@notbase64@@"}}]}]), "messages.0.content.0.source.data"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": image_b64("PNG")}}]}]), "messages.0.content.0.source"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64("PNG")[:60]}}]}]), "messages.0.content.0.source"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:9/a.png"}}]}]),
         "messages.0.content.0.source.url: refused: 127.0.0.1 resolves to 127.0.0.1, a loopback address"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]),
         "messages.0.content.0.source.file_id: file not found: file_1"),
        (body(messages=[{"role": "user", "content": ""}]), "messages.0"),
        (body(temperature=2), "temperature"),
        (body(thinking={"type": "enabled", "budget_tokens": 1024}), "`max_tokens` must be greater"),
        (body(max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 100}), "thinking.enabled.budget_tokens"),
        (body(thinking={"type": "sometimes"}), "thinking.type"),
        (body(tool_choice={"type": "any"}), "tool_choice"),
        (body(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice={"type": "tool", "name": "g"}),
         "tool_choice.name"),
        (body(max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000},
              tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice={"type": "any"}), "Thinking may not"),
        (body(output_config={"format": {"type": "json_object"}}), "output_config.format"),
        (body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I made this up", "signature": "bm90IGEgc2lnbmF0dXJl"}]},
            {"role": "user", "content": "b"}]), "messages.1.content.0.signature"),
    ],
)
def test_bad_input_is_a_400_that_says_where(client, payload, where):
    message = assert_error(client.post("/v1/messages", json=payload), 400, "invalid_request_error")
    assert message.startswith(where), message


def test_non_json_and_empty_bodies_are_400(client):
    for content in (b"", b"{not json", b"[1, 2]"):
        response = client.post("/v1/messages", content=content, headers={"content-type": "application/json"})
        assert_error(response, 400, "invalid_request_error")


def test_a_json_body_behind_a_byte_order_mark_is_read(client):
    """Some Windows clients' UTF-8 encoders write a BOM first; RFC 8259 lets a parser ignore it."""
    bom = b"\xef\xbb\xbf"
    headers = {"content-type": "application/json"}
    for route, payload in (("/v1/messages", body(max_tokens=1)), ("/v1/messages/count_tokens", body()),
                           ("/v1/chat/completions", {"model": "tiny-vl", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "hi"}]})):
        response = client.post(route, content=bom + json.dumps(payload).encode(), headers=headers)
        assert response.status_code == 200, response.text
    assert_error(client.post("/v1/messages", content=bom, headers=headers), 400, "invalid_request_error")


def test_unknown_fields_betas_and_ignored_blocks_are_accepted(client):
    payload = body(
        context_management={"edits": []},
        thinking={"type": "adaptive"},
        service_tier="auto",
        metadata={"user_id": "u-1"},
        some_future_field={"x": 1},
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}, "extra": 1}]},
            {"role": "assistant", "content": [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}, {"type": "text", "text": "ok"}]},
            {"role": "user", "content": "and?"},
        ],
    )
    response = client.post("/v1/messages?beta=true", json=payload, headers={"anthropic-beta": "made-up-2099-01-01,context-1m-2025-08-07"})
    assert response.status_code == 200, response.text


def test_unknown_model_is_404_and_aliases_resolve(client):
    assert_error(client.post("/v1/messages", json=body(model="gpt-5")), 404, "not_found_error")
    for name in ("tiny-vl", "claude-3-5-haiku-latest", "gpt-4o"):
        response = client.post("/v1/messages", json=body(model=name))
        assert response.status_code == 200 and response.json()["model"] == name


def test_models_list_get_and_paginate(client):
    listing = client.get("/v1/models").json()
    assert [m["id"] for m in listing["data"]] == ["tiny-vl", "gpt-4o"]
    assert listing["first_id"] == "tiny-vl" and listing["last_id"] == "gpt-4o" and not listing["has_more"]
    page = client.get("/v1/models", params={"limit": 1}).json()
    assert [m["id"] for m in page["data"]] == ["tiny-vl"] and page["has_more"]
    after = client.get("/v1/models", params={"limit": 1, "after_id": "tiny-vl"}).json()
    assert [m["id"] for m in after["data"]] == ["gpt-4o"] and not after["has_more"]
    before = client.get("/v1/models", params={"before_id": "gpt-4o"}).json()
    assert [m["id"] for m in before["data"]] == ["tiny-vl"]
    assert client.get("/v1/models/claude-opus-4-1").json()["id"] == "claude-opus-4-1"
    assert_error(client.get("/v1/models/llama-3"), 404, "not_found_error")
    assert_error(client.get("/v1/models", params={"limit": 0}), 400, "invalid_request_error")


def test_multipart_form_answers_with_a_message(client):
    files = {"image": ("photo.bin", image_bytes("JPEG"), "application/octet-stream")}
    response = client.post("/v1/messages", data={"prompt": "What is this?", "max_tokens": "5"}, files=files)
    assert response.status_code == 200, response.text
    message = response.json()
    assert message["type"] == "message" and message["usage"]["output_tokens"] <= 5
    with_image = prompt_tokens(message["usage"])
    text_only = client.post("/v1/messages", data={"prompt": "What is this?", "max_tokens": "5"}).json()
    assert with_image > prompt_tokens(text_only["usage"])


def test_multipart_form_takes_an_image_part_without_a_filename(client):
    """curl's ``-F image=<photo.jpg`` and bare bytes in the SDKs send no filename: still an image."""
    ask = {"prompt": (None, "这是什么？".encode()), "max_tokens": (None, b"5")}
    named = client.post("/v1/messages", files={**ask, "image": ("photo.jpg", image_bytes("JPEG"), "image/jpeg")})
    bare = client.post("/v1/messages", files={**ask, "image": (None, image_bytes("JPEG"))})
    text_only = client.post("/v1/messages", files=ask)
    assert named.status_code == bare.status_code == text_only.status_code == 200, bare.text
    assert prompt_tokens(bare.json()["usage"]) == prompt_tokens(named.json()["usage"]) > prompt_tokens(text_only.json()["usage"])
    by_field = client.post("/v1/messages", data={"prompt": "这是什么？", "max_tokens": "5"})
    assert prompt_tokens(by_field.json()["usage"]) == prompt_tokens(text_only.json()["usage"])  # the UTF-8 prompt intact


def test_multipart_form_text_fields_sent_as_files_are_read(client):
    """curl's ``-F system=@prompt.txt`` sends a field as a file: its text counts, as typed in would."""
    system = "你是一位细心的会计。Answer in one line."
    typed = client.post("/v1/messages", data={"prompt": "总额是多少？", "system": system, "max_tokens": "3"})
    as_files = client.post("/v1/messages", files={
        "prompt": ("q.txt", "总额是多少？".encode(), "text/plain"), "system": ("s.txt", system.encode(), "text/plain"),
        "max_tokens": ("n.txt", b"3\n", "text/plain")})
    bare = client.post("/v1/messages", data={"prompt": "总额是多少？", "max_tokens": "3"})
    assert typed.status_code == as_files.status_code == 200, as_files.text
    assert prompt_tokens(as_files.json()["usage"]) == prompt_tokens(typed.json()["usage"]) > prompt_tokens(bare.json()["usage"])
    not_text = client.post("/v1/messages", files={"prompt": ("q.txt", b"\xff\xfe\x00bad", "text/plain")})
    assert "prompt" in assert_error(not_text, 400, "invalid_request_error")


def test_an_urlencoded_form_reads_utf_8_raw_or_percent_encoded(client):
    """``curl -d "prompt=你好"`` sends the UTF-8 bytes raw; browsers and ``--data-urlencode`` escape them."""
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    raw = client.post("/v1/messages", content="prompt=这是 什么？&max_tokens=1&system=系统".encode(), headers=urlencoded)
    escaped = client.post("/v1/messages", data={"prompt": "这是 什么？", "max_tokens": "1", "system": "系统"})
    as_json = client.post("/v1/messages", json=body(max_tokens=1, system="系统", messages=[{"role": "user", "content": "这是 什么？"}]))
    assert raw.status_code == escaped.status_code == as_json.status_code == 200, raw.text
    assert prompt_tokens(raw.json()["usage"]) == prompt_tokens(escaped.json()["usage"]) == prompt_tokens(as_json.json()["usage"])


def test_multipart_form_errors_are_400(client):
    assert_error(client.post("/v1/messages", data={"max_tokens": "5"}, files={"x": ("a", b"b")}), 400, "invalid_request_error")
    bad = {"image": ("a.png", b"not an image at all", "image/png")}
    assert_error(client.post("/v1/messages", data={"prompt": "hi"}, files=bad), 400, "invalid_request_error")
    assert_error(client.post("/v1/messages", data={"prompt": "hi", "max_tokens": "many"}), 400, "invalid_request_error")
    # an urlencoded form cannot carry an image's bytes: say so rather than answer without it
    assert "multipart" in assert_error(client.post("/v1/messages", data={"prompt": "hi", "image": "abc"}), 400, "invalid_request_error")
    for max_tokens in ("0", "-3"):  # an integer the Messages schema refuses: its 400, not a 500
        message = assert_error(client.post("/v1/messages", data={"prompt": "hi", "max_tokens": max_tokens}), 400,
                               "invalid_request_error")
        assert "max_tokens" in message


def test_an_unexpected_failure_is_a_500_that_leaks_nothing(client, monkeypatch):
    engine = client.app.state.engine

    async def explode(conversation):
        raise RuntimeError("secret user content")

    monkeypatch.setattr(engine, "count_tokens", explode)
    message = assert_error(client.post("/v1/messages/count_tokens", json=body()), 500, "api_error")
    assert "secret" not in message


def test_stream_events_have_consecutive_indices(client):
    with client.stream("POST", "/v1/messages", json=body(stream=True, max_tokens=6)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = []
    for frame in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append(data)
    names = [e["type"] for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(e["index"] == 0 for e in events if "index" in e)


def test_served_name_is_the_folder_name_or_the_whole_hub_id(tmp_path):
    from types import SimpleNamespace

    from localvl.api.app import served_name
    from localvl.engine.protocol import ModelInfo

    def engine(source):
        return SimpleNamespace(info=ModelInfo(source, "qwen2_5_vl", 4096))

    folder = tmp_path / "Qwen2.5-VL-7B-Instruct"
    folder.mkdir()
    assert served_name(Settings(), engine(str(folder) + "/")) == "Qwen2.5-VL-7B-Instruct"
    assert served_name(Settings(), engine("Qwen/Qwen2.5-VL-7B-Instruct")) == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert served_name(Settings(served_model_name="vl"), engine("Qwen/Qwen2.5-VL-7B-Instruct")) == "vl"


def test_a_hub_cache_snapshot_given_as_a_folder_is_served_under_its_hub_id(tmp_path):
    # `--model ~/.cache/huggingface/hub/models--Qwen--.../snapshots/<commit>`: was served as the commit hash
    from types import SimpleNamespace

    from localvl.api.app import served_name
    from localvl.engine.protocol import ModelInfo

    commit = "0b8dda4ccf6c3d4444a660fe4e8f027dca55e2e7"
    hugging_face = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / commit
    modelscope = tmp_path / "modelscope" / "models" / "Qwen--Qwen3-VL-2B-Instruct" / "snapshots" / "master"
    other = tmp_path / "snapshots" / "mine"
    for folder in (hugging_face, modelscope, other):
        folder.mkdir(parents=True)
    engine = lambda source: SimpleNamespace(info=ModelInfo(str(source), "qwen2_5_vl", 4096))  # noqa: E731
    assert served_name(Settings(), engine(hugging_face)) == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert served_name(Settings(), engine(modelscope)) == "Qwen/Qwen3-VL-2B-Instruct"
    assert served_name(Settings(), engine(other)) == "mine"
    assert served_name(Settings(served_model_name="vl"), engine(hugging_face)) == "vl"


def test_a_folder_also_answers_to_the_path_it_was_given_by_unlisted(tmp_path):
    """vLLM serves ``--model /models/qwen-vl`` under that path: clients moved from it send the path."""
    from types import SimpleNamespace

    from localvl.api.app import model_names
    from localvl.engine.protocol import ModelInfo

    folder = tmp_path / "models" / "qwen-vl"
    folder.mkdir(parents=True)
    engine = SimpleNamespace(info=ModelInfo(str(folder), "qwen2_5_vl", 4096))
    names = model_names(Settings(model=str(folder)), engine)
    assert names.require(str(folder)).name == names.require("qwen-vl").name == "qwen-vl"
    assert [name for name, _ in names.listed()] == ["qwen-vl"]  # the host's path is not listed
    named = model_names(Settings(model=str(folder), served_model_name="vl"), engine)
    assert named.resolve(str(folder)) is None  # a chosen name is the only one
    hub = model_names(Settings(model="Qwen/Qwen2.5-VL-3B-Instruct"),
                      SimpleNamespace(info=ModelInfo("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 4096)))
    assert [name for name, _ in hub.listed()] == ["Qwen/Qwen2.5-VL-3B-Instruct"]


def test_media_limits_are_settings(loaded_model):
    settings = Settings(served_model_name="tiny-vl", max_images=2, max_image_bytes=4096, max_pdf_pages=1)
    app = create_app(settings, LocalEngine(loaded_model("qwen2_5_vl")))
    picture = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64(size=(40, 30))}}
    with TestClient(app, base_url="http://localhost") as client:  # an open server answers loopback names
        three = body(messages=[{"role": "user", "content": [picture, picture, picture, {"type": "text", "text": "hi"}]}])
        assert "too many images: 3 > 2" in assert_error(client.post("/v1/messages", json=three), 400, "invalid_request_error")
        heavy = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": image_b64(size=(300, 300), compress_level=0)}}
        message = assert_error(client.post("/v1/messages/count_tokens", json=body(messages=[{"role": "user", "content": [heavy]}])),
                               400, "invalid_request_error")
        assert "exceeds 4096 bytes maximum" in message
        from tests.helpers import pdf_bytes
        import base64 as b64

        pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                              "data": b64.b64encode(pdf_bytes(["a", "b"])).decode()}}
        message = assert_error(client.post("/v1/messages", json=body(messages=[{"role": "user", "content": [pdf]}])),
                               400, "invalid_request_error")
        assert "2 pages; at most 1" in message


def test_an_unreachable_database_is_a_503_on_every_route_that_needs_it(loaded_model, tmp_path):
    settings = Settings(served_model_name="tiny-vl", data_dir=tmp_path,
                        database_url="postgresql+asyncpg://user:secret@127.0.0.1:1/nowhere")
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl"))), base_url="http://localhost") as open_client:
        for response in (open_client.post("/v1/messages", json=body()), open_client.get("/v1/files")):
            assert "unreachable" in assert_error(response, 503, "overloaded_error")
            assert response.headers["retry-after"] == "5"


def test_files_belong_to_the_key_that_uploaded_them(client):
    uploaded = client.post("/v1/files", files={"file": ("a.png", image_bytes("PNG"), "image/png")})
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    other = {"x-api-key": "second-key"}
    assert client.get(f"/v1/files/{file_id}").status_code == 200
    assert_error(client.get(f"/v1/files/{file_id}", headers=other), 404, "not_found_error")
    assert_error(client.delete(f"/v1/files/{file_id}", headers=other), 404, "not_found_error")
    assert file_id not in [f["id"] for f in client.get("/v1/files", headers=other).json()["data"]]
    picture = {"type": "image", "source": {"type": "file", "file_id": file_id}}
    refused = client.post("/v1/messages", headers=other, json=body(messages=[{"role": "user", "content": [picture]}]))
    assert "file not found" in assert_error(refused, 400, "invalid_request_error")
    assert client.post("/v1/messages/count_tokens", json=body(messages=[{"role": "user", "content": [picture]}])).status_code == 200


def test_an_uploaded_text_files_byte_order_mark_is_not_read_as_text(client):
    counts = []
    for data in ("总额：42 元".encode(), b"\xef\xbb\xbf" + "总额：42 元".encode()):
        uploaded = client.post("/v1/files", files={"file": ("note.txt", data, "text/plain")})
        assert uploaded.status_code == 200, uploaded.text
        document = {"type": "document", "source": {"type": "file", "file_id": uploaded.json()["id"]}}
        counted = client.post("/v1/messages/count_tokens", json=body(messages=[{"role": "user", "content": [document]}]))
        counts.append(counted.json()["input_tokens"])
    assert counts[0] == counts[1]


def test_file_uploads_have_their_own_limits(loaded_model, tmp_path):
    settings = Settings(served_model_name="tiny-vl", max_request_bytes=4096, max_file_bytes=64 * 1024, data_dir=tmp_path)
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl"))), base_url="http://localhost") as client:
        ok = client.post("/v1/files", files={"file": ("a.bin", b"x" * 20_000, "application/octet-stream")})
        assert ok.status_code == 200 and ok.json()["size_bytes"] == 20_000  # above the 4 KB body limit of messages
        too_big = client.post("/v1/files", files={"file": ("b.bin", b"x" * 100_000, "application/octet-stream")})
        assert_error(too_big, 413, "request_too_large")
        # the limit is the file's, not its form's: exactly 64 KiB goes in, one byte more does not
        exact = client.post("/v1/files", files={"file": ("d.bin", b"x" * 65_536, "application/octet-stream")})
        assert exact.status_code == 200 and exact.json()["size_bytes"] == 65_536
        over = client.post("/v1/files", files={"file": ("e.bin", b"x" * 65_537, "application/octet-stream")})
        assert assert_error(over, 413, "request_too_large") == "file is 65537 bytes; the limit is 65536 bytes"
        empty = client.post("/v1/files", files={"file": ("c.txt", b"", "text/plain")})
        assert "empty" in assert_error(empty, 400, "invalid_request_error")
        both = client.get("/v1/files", params={"ids": ok.json()["id"], "limit": 5})
        assert "mutually exclusive" in assert_error(both, 400, "invalid_request_error")
        assert client.get(f"/v1/files/{ok.json()['id']}/content").content == b"x" * 20_000


def test_upload_names_and_types_the_store_cannot_keep_are_400s_or_set_aside(loaded_model, tmp_path, database_url):
    # PostgreSQL refuses a NUL and values past a column's length: each was a 500 there, while SQLite kept them
    settings = Settings(served_model_name="tiny-vl", data_dir=tmp_path, database_url=database_url)
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl"))), base_url="http://localhost") as client:
        longest = client.post("/v1/files", files={"file": ("文" * 508 + ".txt", b"x", "text/plain")})
        assert longest.status_code == 200 and longest.json()["filename"] == "文" * 508 + ".txt"
        too_long = client.post("/v1/files", files={"file": ("文" * 509 + ".txt", b"x", "text/plain")})
        assert "at most 512 characters" in assert_error(too_long, 400, "invalid_request_error")
        form = (b'--X\r\nContent-Disposition: form-data; name="file"; filename="a\x00b.txt"\r\n'
                b"Content-Type: text/plain\r\n\r\nx\r\n--X--\r\n")
        nul = client.post("/v1/files", content=form, headers={"content-type": "multipart/form-data; boundary=X"})
        assert "NUL" in assert_error(nul, 400, "invalid_request_error")
        # a declared type that is no media type (too long, or not ASCII) is set aside as an undeclared one
        for declared in ("text/" + "x" * 300, "text/中文"):
            upload = client.post("/v1/files", files={"file": ("notes.txt", b"x", declared)})
            assert upload.status_code == 200 and upload.json()["mime_type"] == "text/plain", upload.text
        kept = client.post("/v1/files", files={"file": ("a.csv", b"x", "text/csv; charset=utf-8")})
        assert kept.json()["mime_type"] == "text/csv; charset=utf-8"
        assert len(client.get("/v1/files").json()["data"]) == 4


@pytest.mark.parametrize("name", ["报告/2024 草稿.txt", "résumé 2024.txt", "plain-name_1.txt", "a b;c.txt"])
def test_a_download_names_its_file_per_rfc_6266_with_an_ascii_fallback(client, name):
    import re
    from urllib.parse import unquote

    uploaded = client.post("/v1/files", files={"file": (name, "内容".encode(), "text/plain")}).json()
    assert uploaded["filename"] == name
    header = client.get(f"/v1/files/{uploaded['id']}/content").headers["content-disposition"]
    plain = re.fullmatch(r'attachment; filename="([\x20-\x7e]*)"(?:; filename\*=UTF-8\'\'([^;\s]*))?', header)
    assert plain is not None, header  # the ASCII filename first, for clients that read only it
    if plain.group(2) is None:
        assert plain.group(1) == name
    else:  # RFC 5987: only attr-chars and percent-escapes (no "/", no space)
        assert re.fullmatch(r"[A-Za-z0-9!#$&+.^_`|~%-]*", plain.group(2)) and unquote(plain.group(2)) == name


def test_a_client_that_leaves_mid_body_is_a_499_not_a_server_error(caplog):
    import asyncio

    from starlette.requests import Request

    from localvl.api.middleware import RequestContextMiddleware

    async def app(scope, receive, send):
        await Request(scope, receive).body()  # raises ClientDisconnect when the client goes

    statuses = []

    async def on_response(scope, status, seconds):
        statuses.append(status)

    messages = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        raise AssertionError("nobody is left to answer")

    scope = {"type": "http", "method": "POST", "path": "/v1/files", "headers": [(b"content-length", b"5000000")]}
    middleware = RequestContextMiddleware(app, max_request_bytes=10_000_000, on_response=on_response)
    with caplog.at_level("INFO"):
        asyncio.run(middleware(scope, receive, send))
    assert statuses == [499]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("failure", ["disconnect", "bug"])
def test_the_middlewares_log_lines_name_the_route_never_the_path(caplog, failure):
    """A path holds file and batch ids, and is percent-decoded: a client could forge log lines with
    %0a. The access log writes the route template; so must every other line."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from localvl.api.middleware import RequestContextMiddleware

    path = "/v1/files/file_011SECRETID\n2026-11-27 00:00:00,000 CRITICAL forged/content"

    async def app(scope, receive, send):
        raise ClientDisconnect() if failure == "disconnect" else RuntimeError("a bug")

    async def send(message):
        pass

    async def receive():
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    with caplog.at_level("DEBUG"):
        asyncio.run(RequestContextMiddleware(app, max_request_bytes=1000)(scope, receive, send))
    assert caplog.records and "SECRETID" not in caplog.text and "forged" not in caplog.text


@pytest.mark.parametrize("host, answered", [
    ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True), ("127.0.0.1", True),
    ("app.localhost:8000", True), ("LOCALHOST.:8000", True),
    ("rebound.example:8000", False), ("10.0.0.5:8000", False), ("localhost.rebound.example", False), ("[::ffff:a00:5]", False),
])
def test_an_open_server_answers_only_requests_addressed_to_a_loopback_name(loaded_model, tmp_path_factory, host, answered):
    """With no authentication, a web page whose name its owner rebinds to 127.0.0.1 (DNS rebinding)
    would be same-origin with the server and read its files and batches; its requests carry that
    name as Host, which a loopback server has no reason to answer."""
    settings = Settings(served_model_name="tiny-vl", data_dir=tmp_path_factory.mktemp("data"))
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl")))) as client:
        response = client.get("/v1/files", headers={"host": host})
        if answered:
            assert response.status_code == 200, response.text
        else:
            assert_error(response, 403, "permission_error")
        assert client.get("/health", headers={"host": host}).status_code == 200  # probes need no name


@pytest.mark.parametrize("origin, answered", [
    (None, True), ("http://127.0.0.1:8000", True), ("http://localhost:3000", True),
    ("https://attacker.example", False), ("null", False), ("http://127.0.0.1.attacker.example", False),
])
def test_an_open_server_answers_no_web_page_of_another_origin(loaded_model, tmp_path_factory, origin, answered):
    """A page elsewhere cannot read an open server's answers, but its form POSTs would still run the
    model and act on batches and files; the playground (same origin) and the SDKs (no Origin) are
    answered. With a key configured, the key decides."""
    settings = Settings(served_model_name="tiny-vl", data_dir=tmp_path_factory.mktemp("data"))
    headers = {} if origin is None else {"origin": origin}
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl"))), base_url="http://127.0.0.1:8000") as client:
        response = client.post("/v1/messages/count_tokens", json=body(), headers=headers)
        if answered:
            assert response.status_code == 200, response.text
        else:
            assert "origin" in assert_error(response, 403, "permission_error")


def test_an_open_server_on_purpose_answers_any_name(loaded_model, tmp_path_factory):
    settings = Settings(served_model_name="tiny-vl", insecure_no_auth=True, data_dir=tmp_path_factory.mktemp("data"))
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl")))) as client:
        assert client.get("/v1/files", headers={"host": "vl.example:8000"}).status_code == 200
