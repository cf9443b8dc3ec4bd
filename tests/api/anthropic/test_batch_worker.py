"""The batch worker in process: which engine failures are the request's result, and which give
the request back to be done again."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from localvl.api.app import create_app
from localvl.engine.local import LocalEngine
from localvl.errors import EngineDiedError, InternalError
from localvl.settings import Settings

KEY = "sk-test-batches"


class _Dying:
    """A stream that ends with ``error`` after its first event, as a dying engine ends them."""

    def __init__(self, stream, error):
        self.stream, self.error = stream, error
        self.request_id, self.input_tokens = stream.request_id, stream.input_tokens
        self.events = 0

    @property
    def generated(self):
        return self.stream.generated

    def __aiter__(self):
        return self

    async def __anext__(self):
        self.events += 1
        if self.events == 1:
            return await self.stream.__anext__()
        await self.stream.aclose()
        raise self.error("the engine stopped while generating this response")

    async def aclose(self):
        await self.stream.aclose()


class FailingEngine:
    """The real engine, whose first ``failures`` streams fail midway with ``error``."""

    def __init__(self, engine, error, failures):
        self.engine, self.error, self.failures = engine, error, failures
        self.submitted = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def submit(self, request):
        stream = await self.engine.submit(request)
        self.submitted += 1
        return _Dying(stream, self.error) if self.submitted <= self.failures else stream


@pytest.mark.parametrize(("error", "result", "submitted"), [
    (EngineDiedError, "succeeded", 6),  # the server's failure: given back, done again
    (InternalError, "errored", 3),  # a step that failed on this request: its result
    (RuntimeError, "errored", 3),  # a bug: its result too (claimed again forever, the batch never ended)
])
def test_requests_the_engine_died_under_are_done_again(loaded_model, tmp_path, error, result, submitted):
    settings = Settings(api_key=[KEY], served_model_name="tiny-vl", data_dir=tmp_path)
    engine = FailingEngine(LocalEngine(loaded_model("qwen2_5_vl")), error, failures=3)
    params = {"model": "tiny-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
    with TestClient(create_app(settings, engine), headers={"x-api-key": KEY}) as client:
        created = client.post("/v1/messages/batches", json={"requests": [
            {"custom_id": f"r{i}", "params": params} for i in range(3)]})
        assert created.status_code == 200, created.text
        url = f"/v1/messages/batches/{created.json()['id']}"
        deadline = time.monotonic() + 120  # a guard against hanging, not a timing
        while (batch := client.get(url).json())["processing_status"] != "ended":
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
        lines = [json.loads(line) for line in client.get(url + "/results").text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2"]  # one result each
    assert {line["result"]["type"] for line in lines} == {result}
    assert batch["request_counts"][result] == 3
    assert engine.submitted == submitted
    if result == "errored":
        assert {line["result"]["error"]["error"]["type"] for line in lines} == {"api_error"}


def test_the_worker_sweeps_expired_uploads(loaded_model, tmp_path):
    # The server's one background loop over the store deletes expired files' bytes, which before
    # stayed on disk until someone asked for the file.
    settings = Settings(api_key=[KEY], served_model_name="tiny-vl", data_dir=tmp_path, batch_lease=1.5)
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl"))), headers={"x-api-key": KEY}) as client:
        uploaded = client.post("/v1/files", files={"file": ("note.txt", b"brief", "text/plain")},
                               data={"expires_in_seconds": "0.5"}, headers={"anthropic-beta": "files-api-2025-04-14"})
        assert uploaded.status_code == 200, uploaded.text
        stored = tmp_path / "files"
        assert any(stored.iterdir())
        deadline = time.monotonic() + 60  # a guard against hanging, not a timing
        while any(path.is_file() for path in stored.iterdir()):
            assert time.monotonic() < deadline, list(stored.iterdir())
            time.sleep(0.1)


def test_batch_params_are_held_to_what_the_messages_route_takes(loaded_model, tmp_path):
    settings = Settings(api_key=[KEY], served_model_name="tiny-vl", data_dir=tmp_path)
    good = {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": "Hello"}]}
    loose = {**good, "max_tokens": "2"}  # a string where an integer belongs
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl"))), headers={"x-api-key": KEY}) as client:
        direct = client.post("/v1/messages", json=loose)
        assert direct.status_code == 400 and "max_tokens" in direct.json()["error"]["message"]
        created = client.post("/v1/messages/batches", json={"requests": [
            {"custom_id": "good", "params": good}, {"custom_id": "loose", "params": loose}]})
        assert created.status_code == 200, created.text
        url = f"/v1/messages/batches/{created.json()['id']}"
        deadline = time.monotonic() + 120  # a guard against hanging, not a timing
        while client.get(url).json()["processing_status"] != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        results = {line["custom_id"]: line["result"] for line in map(json.loads, client.get(url + "/results").text.splitlines())}
    assert results["good"]["type"] == "succeeded"
    assert results["loose"]["type"] == "errored"
    error = results["loose"]["error"]["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("params.max_tokens")
