"""Hostile input on the paths beside the request models: JSON that they would refuse, reaching the
routes that read a body as plain JSON first (threads, batches, OpenAI tool-call arguments), and the
form interface. The same 400 as anywhere else, never a 500."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, Server

DEEP = b"[" * 100_000 + b"]" * 100_000
SURROGATE = "\\ud800"  # a lone surrogate escape: valid to Python's json, encodable by no tokenizer


def post(server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body, timeout=60,
                      headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"})


def assert_invalid_request(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text[:300]
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert payload["request_id"] == response.headers["request-id"]


@pytest.mark.parametrize("body", [
    b'{"thread":{"type":"create"},"model":"tiny-vl","max_tokens":4,"messages":' + DEEP + b"}",
    b'{"thread":{"type":"create"},"model":"tiny-vl","max_tokens":4,"messages":[{"role":"user","content":"a'
    + SURROGATE.encode() + b'"}]}',
], ids=["deep", "lone surrogate"])
def test_a_threaded_message_with_hostile_json_is_a_400(server, body):
    assert_invalid_request(post(server, "/v1/messages", body))


@pytest.mark.parametrize("body", [
    b'{"requests":' + DEEP + b"}",
    b'{"requests":[{"custom_id":"a","params":{"model":"tiny-vl","max_tokens":4,"messages":[{"role":"user","content":"a'
    + SURROGATE.encode() + b'"}]}}]}',
], ids=["deep", "lone surrogate"])
def test_a_batch_with_hostile_json_is_refused_when_created(server, body):
    assert_invalid_request(post(server, "/v1/messages/batches", body))


def test_tool_call_arguments_with_a_lone_surrogate_are_a_400(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": "' + SURROGATE + '"}'}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-vl", max_tokens=4, messages=messages)
    assert refused.value.body["type"] == "invalid_request_error" and "arguments" in refused.value.body["message"]


@pytest.mark.parametrize("max_tokens", ["-3", "0"])
def test_the_form_interface_refuses_an_invalid_field_with_a_400(server, max_tokens):
    response = httpx.post(server.url + "/v1/messages", data={"prompt": "hi", "max_tokens": max_tokens},
                          headers={"x-api-key": API_KEY}, timeout=60)
    assert_invalid_request(response)
    assert response.json()["error"]["message"].startswith("max_tokens")


@pytest.fixture(scope="module")
def short_timeout_server(model_dir, tmp_path_factory):
    s = Server(model_dir("qwen2_vl"), tmp_path_factory.mktemp("logs") / "slow-body.log", "--request-timeout", "2",
               "--body-timeout", "3", "--url-allowlist", "127.0.0.1", "--fetch-timeout", "20")
    yield s
    s.stop()


@pytest.mark.parametrize("path, content_type", [
    ("/v1/messages", "application/json"), ("/v1/chat/completions", "application/json"),
    ("/v1/messages", "application/x-www-form-urlencoded"),
])
def test_a_body_that_never_arrives_ends_at_the_request_timeout(short_timeout_server, path, content_type):
    """Headers, then a body withheld (slowloris): --request-timeout holds for the upload too, rather
    than the request (its connection, its place among the running ones) being held forever."""
    with socket.create_connection(("127.0.0.1", short_timeout_server.port)) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: localvl\r\nx-api-key: {API_KEY}\r\n"
                           f"content-type: {content_type}\r\ncontent-length: 1000\r\n\r\n{{".encode())
        connection.settimeout(120)  # only so that a failure cannot hang the suite
        response = http.client.HTTPResponse(connection)
        response.begin()
        body = json.loads(response.read())
    assert response.status == 504
    error = body["error"]
    field, kind = ("type", "timeout_error") if path == "/v1/messages" else ("code", "timeout")
    assert error[field] == kind


@pytest.mark.parametrize("path, content_type", [
    ("/v1/messages/count_tokens", "application/json"), ("/v1/messages/batches", "application/json"),
    ("/v1/files", "multipart/form-data; boundary=x"),
])
def test_a_body_that_stalls_ends_at_the_body_timeout_on_every_route(short_timeout_server, path, content_type):
    """Routes without a --request-timeout of their own (uploads may rightly take long) still end a
    body that stops arriving, after --body-timeout seconds without a byte."""
    with socket.create_connection(("127.0.0.1", short_timeout_server.port)) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: localvl\r\nx-api-key: {API_KEY}\r\n"
                           f"anthropic-beta: files-api-2025-04-14\r\n"
                           f"content-type: {content_type}\r\ncontent-length: 1000\r\n\r\n".encode())
        connection.sendall(b"--x\r\n" if path == "/v1/files" else b"{")  # a body begun as its type begins
        connection.settimeout(120)  # only so that a failure cannot hang the suite
        response = http.client.HTTPResponse(connection)
        response.begin()
        body = json.loads(response.read())
    assert response.status == 504 and body["error"]["type"] == "timeout_error"
    assert "stalled" in body["error"]["message"]


class Dribble(BaseHTTPRequestHandler):
    """An image server that sends a byte every half second, never finishing within --fetch-timeout."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(100):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:  # the fetch gave up
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def dribbling_url():
    origin = ThreadingHTTPServer(("127.0.0.1", 0), Dribble)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{origin.server_address[1]}/slow.png"
    origin.shutdown()


def test_fetching_image_urls_counts_against_the_request_timeout(short_timeout_server, dribbling_url):
    """--request-timeout is counted from the request's start, its URL fetches included: a slow image
    server (or a hundred of them, fetched eight at a time) cannot stretch a request past it."""
    client = anthropic.Anthropic(base_url=short_timeout_server.url, api_key=API_KEY, max_retries=0, timeout=120)
    with pytest.raises(anthropic.APIStatusError) as timed_out:
        client.messages.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": dribbling_url}}, {"type": "text", "text": "?"}]}])
    assert timed_out.value.status_code == 504 and timed_out.value.body["error"]["type"] == "timeout_error"
    oai = openai.OpenAI(base_url=short_timeout_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.APIStatusError) as timed_out:
        oai.chat.completions.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": dribbling_url}}]}])
    assert timed_out.value.status_code == 504 and timed_out.value.code == "timeout"
