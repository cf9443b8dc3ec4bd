"""The Chat Completions route in process: how the choices of one request (``n``) are admitted."""

import pytest
from fastapi.testclient import TestClient

from localvl.api.app import create_app
from localvl.engine.local import LocalEngine
from localvl.errors import ServiceUnavailableError
from localvl.settings import Settings

KEY = "sk-test-openai"


class _Tracked:
    def __init__(self, stream, closed):
        self.stream, self.closed = stream, closed
        self.request_id, self.input_tokens = stream.request_id, stream.input_tokens

    @property
    def generated(self):
        return self.stream.generated

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.stream.__anext__()

    async def aclose(self):
        self.closed.append(self.request_id)
        await self.stream.aclose()


class RefusingEngine:
    """The real engine, refusing its ``refuse``-th submission (1-based) with a 503."""

    def __init__(self, engine, refuse):
        self.engine, self.refuse = engine, refuse
        self.checked: list[bool] = []  # each submission's queue_checked
        self.admitted: list[str] = []
        self.closed: list[str] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def submit(self, request):
        self.checked.append(request.queue_checked)
        if len(self.checked) == self.refuse:
            raise ServiceUnavailableError("the engine is not running")
        stream = await self.engine.submit(request)
        self.admitted.append(stream.request_id)
        return _Tracked(stream, self.closed)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_choice_is_refused_leaves_none_of_its_choices_running(loaded_model, tmp_path, stream):
    engine = RefusingEngine(LocalEngine(loaded_model("qwen2_5_vl")), refuse=3)
    settings = Settings(api_key=[KEY], served_model_name="tiny-vl", data_dir=tmp_path)
    body = {"model": "tiny-vl", "max_tokens": 4, "n": 4, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]}
    with TestClient(create_app(settings, engine), headers={"authorization": f"Bearer {KEY}"}) as client:
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["type"]
        # the queue limit was checked for the request once, at its first choice
        assert engine.checked == [False, True, True]
        assert engine.admitted and sorted(engine.closed) == sorted(engine.admitted)  # all or nothing
        answered = client.post("/v1/chat/completions", json={**body, "stream": False})
    assert answered.status_code == 200 and [c["index"] for c in answered.json()["choices"]] == [0, 1, 2, 3]
    assert engine.checked[3:] == [False, True, True, True]
