"""Operations against a running server: /ready, /metrics, and logs that never hold request content."""

from __future__ import annotations

import base64
import json
import re

import anthropic
import httpx
import pytest

from tests.e2e.conftest import API_KEY
from tests.helpers import image_bytes


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else r"(\{[^}]*\})?") + r" ([0-9.e+-]+)"
    return sum(float(m.group(m.lastindex)) for m in re.finditer(pattern, text))


def test_ready_and_metrics(server, client):
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"
    headers = {"x-api-key": API_KEY}
    assert httpx.get(server.url + "/metrics").status_code == 401  # keys configured: metrics need one too
    before = httpx.get(server.url + "/metrics", headers=headers).text
    message = client.messages.create(model="tiny-vl", max_tokens=6, messages=[{"role": "user", "content": "hi"}])
    client.messages.count_tokens(model="tiny-vl", messages=[{"role": "user", "content": "hi"}])
    after = httpx.get(server.url + "/metrics", headers=headers).text
    assert metric(after, "localvl_http_requests_total", route="/v1/messages", status="200") == \
        metric(before, "localvl_http_requests_total", route="/v1/messages", status="200") + 1
    assert metric(after, "localvl_tokens_total", kind="output") - metric(before, "localvl_tokens_total", kind="output") \
        >= message.usage.output_tokens
    assert metric(after, "localvl_time_to_first_token_seconds_count") > metric(before, "localvl_time_to_first_token_seconds_count")
    for gauge in ("localvl_kv_blocks_total", "localvl_running_requests", "localvl_queued_requests"):
        assert re.search(rf"^{gauge} ", after, re.M), gauge
    assert httpx.get(server.url + "/v1/files/file_011nosuchfile", headers=headers).status_code == 404
    labelled = httpx.get(server.url + "/metrics", headers=headers).text
    assert metric(labelled, "localvl_http_requests_total", route="/v1/files/{file_id}", status="404") >= 1
    assert "file_011nosuchfile" not in labelled  # routes are templates: ids never become labels


def test_no_request_content_reaches_the_logs(server, client):
    """A canary in text, in an image, in a tool's input, in a thinking block and in a bad request:
    none of it appears in any log line (the server logs at debug level)."""
    canary = "CANARY-7f3a9c-do-not-log"
    picture = image_bytes("PNG", size=(64, 48))
    picture_b64 = base64.b64encode(picture).decode()
    client.messages.create(model="tiny-vl", max_tokens=4, system=f"system {canary}", messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": picture_b64}},
        {"type": "text", "text": f"text {canary}"}]}])
    client.messages.create(model="tiny-vl", max_tokens=4, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": canary}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": canary}]}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    for bad in (
        [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": canary}}]}],
        [{"role": "user", "content": canary}, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": canary, "signature": "bogus"}]}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": [{"type": canary, "text": canary}]}],
    ):
        with pytest.raises(anthropic.BadRequestError) as error:
            client.messages.create(model="tiny-vl", max_tokens=4, messages=bad)
        assert canary not in str(error.value.body)  # error messages never quote content either
    with client.messages.stream(model="tiny-vl", max_tokens=300, messages=[{"role": "user", "content": f"left {canary}"}]) as stream:
        next(iter(stream))  # the client leaves: the engine says so at debug level
    import time

    deadline = time.monotonic() + 30
    while not re.search(r"DEBUG localvl\S*: \S+ aborted", server.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    assert re.search(r"DEBUG localvl\S*: \S+ aborted", log)  # the server really logs at debug level
    assert canary not in log
    assert picture_b64[100:140] not in log


def test_sigterm_drains_a_running_stream_and_refuses_new_work(model_dir, tmp_path):
    import json
    import os
    import signal
    import time

    from tests.e2e.conftest import Server

    server = Server(model_dir("qwen2_vl"), tmp_path / "term.log", "--shutdown-timeout", "60")
    headers = {"x-api-key": API_KEY}
    try:
        # A story of at least 400 characters, by the output's schema: random weights would otherwise
        # now and then end the turn before the stream could be interrupted, or during the drain's checks.
        story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}
        payload = {"model": "tiny-vl", "max_tokens": 400, "stream": True, "messages": [{"role": "user", "content": "Tell a story."}],
                   "output_config": {"format": {"type": "json_schema", "schema": story}}}
        events: list[str] = []
        with httpx.stream("POST", server.url + "/v1/messages", json=payload, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events.count("content_block_delta") == 3:
                        os.kill(server.process.pid, signal.SIGTERM)  # mid-stream
                        for _ in range(100):  # the drain begins: the load balancer's probe says go elsewhere
                            if httpx.get(server.url + "/ready", timeout=5).status_code == 503:
                                break
                            time.sleep(0.05)
                        else:
                            raise AssertionError("/ready still 200 after SIGTERM")
                        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
                        refused = httpx.post(server.url + "/v1/messages", json={**payload, "stream": False}, headers=headers, timeout=5)
                        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
                        assert refused.json()["error"]["type"] == "overloaded_error"
                elif line.startswith("data: ") and '"type":"message_delta"' in line:
                    final = json.loads(line[6:])
        assert events[-1] == "message_stop" and "error" not in events  # the stream finished normally
        assert final["delta"]["stop_reason"] in ("end_turn", "max_tokens")
        assert server.process.wait(timeout=60) == 0  # it exits once the last request ended
        assert "Application shutdown complete" in server.log()
    finally:
        server.stop()


def test_requests_outliving_the_drain_end_with_503_in_their_envelope(model_dir, tmp_path):
    import os
    import signal
    import threading

    from tests.e2e.conftest import Server

    server = Server(model_dir("qwen2_vl"), tmp_path / "cut.log", "--shutdown-timeout", "0.5")
    headers = {"x-api-key": API_KEY}
    story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 3000}}, "required": ["story"]}
    payload = {"model": "tiny-vl", "max_tokens": 3000, "messages": [{"role": "user", "content": "Tell a long story."}],
               "output_config": {"format": {"type": "json_schema", "schema": story}}}
    plain: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: plain.append(
        httpx.post(server.url + "/v1/messages", json=payload, headers=headers, timeout=120)))
    try:
        events: list[str] = []
        data: list[str] = []
        with httpx.stream("POST", server.url + "/v1/messages", json={**payload, "stream": True}, headers=headers,
                          timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events.count("content_block_delta") == 2:
                        waiting.start()
                    if events.count("content_block_delta") == 20:
                        os.kill(server.process.pid, signal.SIGTERM)  # both requests outlive a 0.5 s drain
                elif line.startswith("data: "):
                    data.append(line[6:])
        waiting.join(timeout=60)
        assert events[-1] == "error" and "message_stop" not in events  # ended, not cut off mid-chunk
        assert json.loads(data[-1])["error"]["type"] == "overloaded_error"
        assert plain[0].status_code == 503 and plain[0].json()["error"]["type"] == "overloaded_error"
        assert plain[0].headers["request-id"].startswith("req_")
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("engine", ["process", "thread"])
def test_a_second_signal_ends_running_requests_at_once_with_503_in_their_envelope(model_dir, tmp_path, engine):
    """The second Ctrl-C skips the drain's wait, not its way of ending requests: no plain-text 500,
    no stream cut off mid-chunk (uvicorn's own exit cancelled the handlers)."""
    import os
    import signal
    import threading
    import time

    from tests.e2e.conftest import Server

    extra = [] if engine == "process" else ["--no-engine-process"]
    # A drain far longer than the test waits: only the second signal can end it in time.
    server = Server(model_dir("qwen2_vl"), tmp_path / "twice.log", "--shutdown-timeout", "600", *extra)
    headers = {"x-api-key": API_KEY}
    # Long answers by their schema: random weights would otherwise now and then end early.
    story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 20000}}, "required": ["story"]}
    ask = [{"role": "user", "content": "Tell a long story."}]
    messages = {"model": "tiny-vl", "max_tokens": 20000, "temperature": 0, "messages": ask,
                "output_config": {"format": {"type": "json_schema", "schema": story}}}
    chat = {"model": "tiny-vl", "max_tokens": 20000, "temperature": 0, "messages": ask,
            "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": story}}}
    requests = {
        "messages": ("/v1/messages", messages),
        "messages-stream": ("/v1/messages", {**messages, "stream": True}),
        "chat": ("/v1/chat/completions", chat),
        "chat-stream": ("/v1/chat/completions", {**chat, "stream": True}),
    }
    answers: dict[str, tuple[int, str, bytes] | httpx.HTTPError] = {}

    def send(name: str) -> None:
        path, payload = requests[name]
        try:
            with httpx.stream("POST", server.url + path, json=payload, headers=headers, timeout=120) as response:
                answers[name] = (response.status_code, response.headers.get("content-type", ""), response.read())
        except httpx.HTTPError as error:  # a stream cut off mid-chunk
            answers[name] = error

    senders = [threading.Thread(target=send, args=(name,)) for name in requests]
    try:
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while metric(httpx.get(server.url + "/metrics", headers=headers, timeout=5).text, "localvl_running_requests") < 4:
            assert time.monotonic() < deadline, "the four requests never ran together"
            time.sleep(0.1)
        os.kill(server.process.pid, signal.SIGINT)
        while httpx.get(server.url + "/ready", timeout=5).status_code != 503:  # the drain has begun
            assert time.monotonic() < deadline, "/ready still 200 after the first signal"
            time.sleep(0.05)
        os.kill(server.process.pid, signal.SIGINT)
        for sender in senders:
            sender.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
        assert not [error for error in answers.values() if isinstance(error, httpx.HTTPError)], answers
        status, kind, body = answers["messages"]
        assert (status, kind) == (503, "application/json"), body[:200]
        assert json.loads(body)["error"]["type"] == "overloaded_error"
        status, kind, body = answers["chat"]
        assert (status, kind) == (503, "application/json"), body[:200]
        assert json.loads(body)["error"]["code"] == "overloaded"  # OpenAI's words
        status, _, body = answers["messages-stream"]
        events = [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]
        data = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "error" and "message_stop" not in events
        assert json.loads(data[-1])["error"]["type"] == "overloaded_error"
        status, _, body = answers["chat-stream"]
        data = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["code"] == "overloaded"
        assert "Traceback" not in server.log() and "CancelledError" not in server.log()
    finally:
        server.stop()
        for sender in senders:
            sender.join(timeout=30)


def test_when_the_engine_process_dies_open_streams_end_with_an_error_and_the_server_exits_1(model_dir, tmp_path):
    import os
    import signal

    from tests.e2e.conftest import Server

    server = Server(model_dir("qwen2_vl"), tmp_path / "dead.log", "--shutdown-timeout", "30")
    try:
        engine_pid = server.engine_pid()
        payload = {"model": "tiny-vl", "max_tokens": 30000, "stream": True, "temperature": 1,
                   "messages": [{"role": "user", "content": "Tell a very long story."}]}
        events: list[str] = []
        with httpx.stream("POST", server.url + "/v1/messages", json=payload, headers={"x-api-key": API_KEY}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events[-1] == "content_block_delta" and events.count("content_block_delta") == 1:
                        os.kill(engine_pid, signal.SIGKILL)  # as the kernel's OOM killer would
        assert events[-1] == "error" and "message_stop" not in events
        assert server.process.wait(timeout=60) == 1  # a supervisor (systemd Restart=on-failure) restarts it
        assert "the engine process stopped unexpectedly" in server.log()
    finally:
        server.stop()


def resume_and_stop(server, engine_pid: int, senders: list) -> None:
    """A SIGSTOP test's cleanup: the engine process runs again (so the stop can end it), the
    server stops, and the test's client threads are waited for."""
    import os
    import signal

    try:
        os.kill(engine_pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    server.stop()
    for sender in senders:
        if sender.is_alive():
            sender.join(timeout=60)


def test_a_hung_engine_process_times_requests_out_and_is_killed_at_shutdown(model_dir, tmp_path):
    """SIGSTOP stands in for a hung engine process: requests waiting on it (even to be taken) end
    with 504 at --request-timeout, and the shutdown kills it instead of waiting a minute."""
    import os
    import signal
    import threading

    from tests.e2e.conftest import Server

    server = Server(model_dir("qwen2_vl"), tmp_path / "hung.log", "--request-timeout", "4", "--shutdown-timeout", "1")
    engine_pid = server.engine_pid()
    headers = {"x-api-key": API_KEY}
    ask = [{"role": "user", "content": "Tell a very long story."}]
    later: dict[str, httpx.Response | httpx.HTTPError] = {}

    def send(name: str, path: str, payload: dict) -> None:
        try:
            later[name] = httpx.post(server.url + path, json=payload, headers=headers, timeout=60)
        except httpx.HTTPError as error:  # the test's own bound: nothing came back
            later[name] = error

    senders = [
        threading.Thread(target=send, args=("messages", "/v1/messages", {"model": "tiny-vl", "max_tokens": 5, "messages": ask})),
        threading.Thread(target=send, args=("chat-stream", "/v1/chat/completions",
                                            {"model": "tiny-vl", "max_tokens": 5, "stream": True, "messages": ask})),
    ]
    try:
        events: list[str] = []
        data: list[str] = []
        payload = {"model": "tiny-vl", "max_tokens": 30000, "stream": True, "temperature": 1, "messages": ask}
        with httpx.stream("POST", server.url + "/v1/messages", json=payload, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events[-1] == "content_block_delta" and events.count("content_block_delta") == 1:
                        os.kill(engine_pid, signal.SIGSTOP)
                        for sender in senders:
                            sender.start()
                elif line.startswith("data: "):
                    data.append(line[6:])
        for sender in senders:
            sender.join(timeout=60)
        assert events[-1] == "error" and json.loads(data[-1])["error"]["type"] == "timeout_error"
        # Never taken by the engine, so no stream began: a 504 in each API's envelope.
        assert later["messages"].status_code == 504 and later["messages"].json()["error"]["type"] == "timeout_error"
        assert later["chat-stream"].status_code == 504 and later["chat-stream"].json()["error"]["code"] == "timeout"
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0  # it waited 60 s for the engine process before
        assert "the engine process did not stop" in server.log() and "Traceback" not in server.log()
    finally:
        resume_and_stop(server, engine_pid, senders)


def test_a_hung_engine_process_with_a_full_pipe_leaves_the_server_answering(model_dir, tmp_path):
    """SIGSTOP stands in for a hung engine process; image requests fill the command pipe behind it
    (1 MiB; ~115 KB each here) and time out, and each timeout aborts its request on the event loop.
    A write to the full pipe there froze every route: now /health and /ready still answer, and once
    the engine runs again, so do requests."""
    import os
    import signal
    import threading

    from tests.e2e.conftest import Server

    server = Server(model_dir("qwen2_5_vl"), tmp_path / "full.log", "--request-timeout", "3", "--shutdown-timeout", "1")
    engine_pid = server.engine_pid()
    headers = {"x-api-key": API_KEY}
    pictures = [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": base64.b64encode(image_bytes(size=(640, 480), color=(40 * k, 90, 200))).decode()}}
                for k in range(4)]
    payload = {"model": "tiny-vl", "max_tokens": 5, "messages": [{"role": "user", "content": [*pictures, {"type": "text", "text": "Describe these."}]}]}
    answers: list[httpx.Response | httpx.HTTPError] = []

    def send() -> None:
        try:
            answers.append(httpx.post(server.url + "/v1/messages", json=payload, headers=headers, timeout=60))
        except httpx.HTTPError as error:  # the test's own bound: nothing came back
            answers.append(error)

    senders = [threading.Thread(target=send) for _ in range(16)]
    try:
        os.kill(engine_pid, signal.SIGSTOP)
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=60)
        assert [getattr(answer, "status_code", answer) for answer in answers] == [504] * 16
        # 10 s: a frozen event loop never answers; a live one answers in milliseconds
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert httpx.get(server.url + "/ready", timeout=10).status_code in (200, 503)  # 503 once it counts as hung
        os.kill(engine_pid, signal.SIGCONT)
        after = httpx.post(server.url + "/v1/messages", json=payload, headers=headers, timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["output_tokens"] > 0
        assert "Traceback" not in server.log()
    finally:
        resume_and_stop(server, engine_pid, senders)


def test_the_access_log_is_one_json_line_per_request_without_content(server, client):
    marker = "MARKER_in_a_query_string_7f3a"  # uvicorn's own access log wrote paths and query strings
    httpx.get(f"{server.url}/v1/files", params={"after_id": marker}, headers={"x-api-key": API_KEY}, timeout=30)
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert marker not in server.log()
    lines = [json.loads(line.split("localvl.access: ", 1)[1]) for line in server.log().splitlines() if "localvl.access: " in line]
    mine = [line for line in lines if line.get("route") == "/v1/messages" and line.get("output_tokens") == message.usage.output_tokens]
    assert mine, lines[-3:]
    entry = mine[-1]
    assert entry["status"] == 200 and entry["method"] == "POST" and entry["request_id"].startswith("req_")
    assert entry["model"] == "tiny-vl" and entry["key"].startswith("static-") and API_KEY not in json.dumps(entry)
    assert entry["input_tokens"] + entry["cache_read_input_tokens"] + entry["cache_creation_input_tokens"] > 0
