"""Limits in process: rate limits and their headers, running-request slots, the time limit,
drain refusals, the response cache."""

import json

import pytest
from fastapi.testclient import TestClient

from localvl.api.app import create_app
from localvl.engine.local import LocalEngine
from localvl.settings import Settings
from tests.api.test_app import assert_error, body

KEY = "sk-limits"


@pytest.fixture(scope="module")
def engine(loaded_model):
    return LocalEngine(loaded_model("qwen2_5_vl"))


def make_client(engine, tmp_path, **settings):
    values = dict(api_key=[KEY, "sk-other"], served_model_name="tiny-vl", data_dir=tmp_path, alias=["claude-*"])
    values.update(settings)
    return TestClient(create_app(Settings(**values), engine), headers={"x-api-key": KEY})


def test_requests_over_the_rpm_get_429_with_anthropics_headers(engine, tmp_path):
    with make_client(engine, tmp_path, rpm=2) as client:
        first = client.post("/v1/messages", json=body())
        assert first.status_code == 200
        assert first.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
        assert first.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        assert client.post("/v1/messages", json=body()).status_code == 200
        refused = client.post("/v1/messages", json=body())
        assert_error(refused, 429, "rate_limit_error")
        assert int(refused.headers["retry-after"]) >= 25
        assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
        # The same limit on the OpenAI route, in its envelope; another key has its own allowance.
        chat = client.post("/v1/chat/completions", json={"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 429 and chat.json()["error"]["type"] == "rate_limit_error"
        # ... where the key's standing is told in OpenAI's headers, not Anthropic's
        assert chat.headers["x-ratelimit-remaining-requests"] == "0" and int(chat.headers["retry-after"]) >= 25
        assert not any(name.startswith("anthropic-ratelimit") for name in chat.headers)
        assert client.post("/v1/messages", json=body(), headers={"x-api-key": "sk-other"}).status_code == 200
        # Routes that generate nothing are not limited.
        assert client.post("/v1/messages/count_tokens", json=body()).status_code == 200
        assert client.get("/v1/models").status_code == 200


def test_output_tokens_are_charged_when_the_answer_ends(engine, tmp_path):
    with make_client(engine, tmp_path, otpm=5) as client:
        first = client.post("/v1/messages", json=body(max_tokens=20, temperature=0))
        assert first.status_code == 200 and first.headers["anthropic-ratelimit-output-tokens-remaining"] == "5"
        used = first.json()["usage"]["output_tokens"]
        second = client.post("/v1/messages", json=body(max_tokens=20))
        if used > 5:  # the first answer put the bucket in debt: wait it off
            assert_error(second, 429, "rate_limit_error")
        else:
            assert int(second.headers["anthropic-ratelimit-output-tokens-remaining"]) == 5 - used


def test_running_slots_are_given_back_however_a_request_ends(engine, tmp_path):
    with make_client(engine, tmp_path, max_streams_per_key=1) as client:
        limiter = client.app.state.limiter
        assert client.post("/v1/messages", json=body()).status_code == 200
        with client.stream("POST", "/v1/messages", json=body(stream=True)) as streamed:
            assert streamed.status_code == 200 and b"message_stop" in b"".join(streamed.iter_bytes())
        assert_error(client.post("/v1/messages", json=body(max_tokens=-1)), 400, "invalid_request_error")
        assert limiter._running == {}


def test_a_request_past_its_time_limit_ends_with_504_timeout_error(engine, tmp_path):
    with make_client(engine, tmp_path, request_timeout=1e-6) as client:
        assert_error(client.post("/v1/messages", json=body(max_tokens=50)), 504, "timeout_error")
        # The limit counts from the request's start: it passes before the hand-off to the engine,
        # so before any stream begins.
        assert_error(client.post("/v1/messages", json=body(max_tokens=50, stream=True)), 504, "timeout_error")
        chat = client.post("/v1/chat/completions", json={"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 504 and chat.json()["error"]["code"] == "timeout"  # OpenAI's words


class SilentEngine:
    """``engine``, except that its streams never say anything."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def submit(self, request):
        from tests.api.fake_stream import FakeStream

        return FakeStream([], delay=3600)


def test_a_stream_past_its_time_limit_ends_with_an_error_event(engine, tmp_path):
    with make_client(SilentEngine(engine), tmp_path, request_timeout=2) as client:
        with client.stream("POST", "/v1/messages", json=body(max_tokens=50, stream=True)) as streamed:
            text = b"".join(streamed.iter_bytes()).decode()
        assert streamed.status_code == 200 and "event: error" in text and '"timeout_error"' in text
        chat = {"model": "tiny-vl", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with client.stream("POST", "/v1/chat/completions", json=chat) as streamed:
            data = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "timeout"


def test_draining_refuses_new_work_but_answers_probes(engine, tmp_path):
    with make_client(engine, tmp_path) as client:
        client.app.state.traffic.draining = True
        refused = client.post("/v1/messages", json=body())
        assert_error(refused, 503, "overloaded_error")
        assert refused.headers["retry-after"] == "5"
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503
        assert client.get("/metrics").status_code == 200


def test_an_engine_that_stopped_answering_is_not_ready_until_it_answers_again(engine, tmp_path):
    """``responsive`` is a ProcessEngine's view of a hung engine process (tests/engine/test_process.py)."""
    hung = SilentEngine(engine)
    hung.responsive = False
    with make_client(hung, tmp_path) as client:
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json() == {"status": "not ready"}
        assert client.get("/health").status_code == 200
        hung.responsive = True
        assert client.get("/ready").json()["status"] == "ready"


def _events(text):
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_the_response_cache_answers_exact_deterministic_repeats(engine, tmp_path):
    with make_client(engine, tmp_path, response_cache=8) as client:
        ask = body(max_tokens=12, temperature=0, messages=[{"role": "user", "content": "cache me"}])
        first = client.post("/v1/messages", json=ask)
        assert first.headers["x-localvl-cache"] == "miss"
        again = client.post("/v1/messages", json=ask)
        assert again.headers["x-localvl-cache"] == "hit"
        a, b = first.json(), again.json()
        assert a["id"] != b["id"] and {**a, "id": None, "usage": None} == {**b, "id": None, "usage": None}
        prompt = sum(a["usage"][k] for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
        # nothing computed, nothing written to the prefix cache: the whole prompt reads as cached
        assert b["usage"] == {**a["usage"], "input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": prompt}
        # A streaming client gets the stored answer replayed as the events a live stream sends.
        with client.stream("POST", "/v1/messages", json={**ask, "stream": True}) as streamed:
            assert streamed.headers["x-localvl-cache"] == "hit"
            events = _events(b"".join(streamed.iter_bytes()).decode())
        kinds = [e["type"] for e in events]
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
        text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
        assert text == "".join(block.get("text", "") for block in a["content"])
        assert events[-2]["usage"]["output_tokens"] == a["usage"]["output_tokens"]
        # Not shared across keys; not for sampled requests; a different request is a different entry.
        other = client.post("/v1/messages", json=ask, headers={"x-api-key": "sk-other"})
        assert other.headers["x-localvl-cache"] == "miss"
        assert "x-localvl-cache" not in client.post("/v1/messages", json={**ask, "temperature": 1}).headers
        assert client.post("/v1/messages", json={**ask, "max_tokens": 11}).headers["x-localvl-cache"] == "miss"


def test_a_shared_response_cache_serves_every_key(engine, tmp_path):
    with make_client(engine, tmp_path, response_cache=8, response_cache_shared=True) as client:
        ask = body(max_tokens=6, temperature=0)
        assert client.post("/v1/messages", json=ask).headers["x-localvl-cache"] == "miss"
        assert client.post("/v1/messages", json=ask, headers={"x-api-key": "sk-other"}).headers["x-localvl-cache"] == "hit"


def test_a_shared_response_cache_never_answers_about_another_keys_file(engine, tmp_path):
    # The cache is read before the request's files are: shared, a key that knew another's file id
    # got the answer about that file, which it may not read.
    from tests.helpers import image_bytes

    with make_client(engine, tmp_path, response_cache=8, response_cache_shared=True) as client:
        beta = {"anthropic-beta": "files-api-2025-04-14"}
        uploaded = client.post("/v1/files", files={"file": ("a.png", image_bytes(), "image/png")}, headers=beta).json()
        image = {"type": "image", "source": {"type": "file", "file_id": uploaded["id"]}}
        ask = body(max_tokens=6, temperature=0, messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}])
        first = client.post("/v1/messages", json=ask, headers=beta)
        assert first.status_code == 200 and first.headers["x-localvl-cache"] == "miss"
        assert client.post("/v1/messages", json=ask, headers=beta).headers["x-localvl-cache"] == "hit"
        stranger = client.post("/v1/messages", json=ask, headers={**beta, "x-api-key": "sk-other"})
        assert "file not found" in assert_error(stranger, 400, "invalid_request_error")


def test_chat_completions_are_cached_too(engine, tmp_path):
    with make_client(engine, tmp_path, response_cache=8) as client:
        ask = {"model": "tiny-vl", "max_tokens": 10, "temperature": 0, "messages": [{"role": "user", "content": "cache me too"}]}
        first = client.post("/v1/chat/completions", json=ask)
        again = client.post("/v1/chat/completions", json=ask)
        assert (first.headers["x-localvl-cache"], again.headers["x-localvl-cache"]) == ("miss", "hit")
        a, b = first.json(), again.json()
        assert a["id"] != b["id"] and a["choices"] == b["choices"]
        assert b["usage"] == {**a["usage"], "prompt_tokens_details": {"cached_tokens": a["usage"]["prompt_tokens"]}}
        assert "localvl_usage" not in b
        with client.stream("POST", "/v1/chat/completions",
                           json={**ask, "stream": True, "stream_options": {"include_usage": True}}) as streamed:
            assert streamed.headers["x-localvl-cache"] == "hit"
            lines = [line for line in b"".join(streamed.iter_bytes()).decode().splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == (a["choices"][0]["message"]["content"] or "")
        assert chunks[-1]["usage"] == b["usage"] and chunks[-2]["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
        # A streamed miss fills the cache for plain requests too.
        other = {**ask, "messages": [{"role": "user", "content": "streamed first"}], "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=other) as streamed:
            assert streamed.headers["x-localvl-cache"] == "miss"
            b"".join(streamed.iter_bytes())
        assert client.post("/v1/chat/completions", json={**other, "stream": False}).headers["x-localvl-cache"] == "hit"
