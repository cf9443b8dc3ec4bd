"""``localvl chat`` without a server: arguments, attachments, error lines, and the session loop
driven by a fake client (the real server is in tests/e2e/test_chat.py)."""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx
import pytest

from localvl import chat
from localvl.cli import main
from tests.e2e.conftest import free_port
from tests.helpers import image_bytes, pdf_bytes


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chat.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["chat", *argv])


# -- arguments and environment -----------------------------------------------------------------


def test_the_chat_command_is_registered_and_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from localvl.cli import main; main(['chat', '--help'])"
    run = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert run.returncode == 0 and "--image" in run.stdout
    check = "import sys, localvl.cli, localvl.chat; print('torch' in sys.modules, 'anthropic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.split() == ["False", "False"]


def test_arguments_and_defaults():
    args = parse("--image", "a.png", "--image", "b.jpg", "--pdf", "c.pdf", "--max-tokens", "7", "--system", "be brief", "q")
    assert args.question == "q" and args.image == [Path("a.png"), Path("b.jpg")] and args.pdf == [Path("c.pdf")]
    assert (args.max_tokens, args.system, args.run) == (7, "be brief", chat.run)
    bare = parse()
    assert (bare.question, bare.url, bare.model, bare.api_key, bare.image, bare.interactive) == (None, None, None, None, [], False)
    assert bare.max_tokens == chat.DEFAULT_MAX_TOKENS


def test_url_and_key_come_from_flags_then_the_environment(monkeypatch):
    for name in ("LOCALVL_URL", "LOCALVL_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert chat.resolve_url(None) == "http://127.0.0.1:8000"
    assert chat.resolve_key(None) is None
    monkeypatch.setenv("LOCALVL_URL", "http://gpu-box:9000/")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    assert chat.resolve_url(None) == "http://gpu-box:9000" and chat.resolve_key(None) == "sk-ant"
    monkeypatch.setenv("LOCALVL_API_KEY", "first, second")  # the server's list form: the first key
    assert chat.resolve_key(None) == "first"
    assert chat.resolve_url("http://other") == "http://other" and chat.resolve_key("flag") == "flag"


# -- attachments -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                                             ("WEBP", "image/webp")])
def test_image_types_come_from_the_bytes_not_the_name(tmp_path, fmt, media_type):
    path = tmp_path / "picture.txt"  # a misleading name on purpose
    path.write_bytes(image_bytes(fmt))
    block = chat.image_block(path)
    assert block["source"]["media_type"] == media_type
    assert base64.b64decode(block["source"]["data"]) == path.read_bytes()


@pytest.mark.parametrize("data", [b"", b"BM\x00\x00 a bitmap", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"%PDF-1.4"])
def test_other_files_are_not_images(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(chat.ChatError, match=r"x\.png: not a PNG, JPEG, GIF or WebP image"):
        chat.image_block(path)


def test_missing_files_and_non_pdfs_are_named(tmp_path):
    with pytest.raises(chat.ChatError, match=r"image .*nope\.png: no such file"):
        chat.image_block(tmp_path / "nope.png")
    with pytest.raises(chat.ChatError, match="is a directory"):
        chat.pdf_block(tmp_path)
    (tmp_path / "a.pdf").write_bytes(image_bytes())
    with pytest.raises(chat.ChatError, match=r"a\.pdf: not a PDF file"):
        chat.pdf_block(tmp_path / "a.pdf")
    (tmp_path / "b.pdf").write_bytes(pdf_bytes(["x"]))
    assert chat.pdf_block(tmp_path / "b.pdf")["source"]["media_type"] == "application/pdf"


def test_attachments_go_before_the_question():
    content = chat.user_content("what is this?", [{"type": "image"}, {"type": "document"}])
    assert [part["type"] for part in content] == ["image", "document", "text"]


# -- error lines -------------------------------------------------------------------------------


def status_error(cls, status: int, body: dict) -> anthropic.APIStatusError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://h/v1/messages"), json=body)
    return cls("ignored", response=response, body=body)


def test_error_lines_say_what_happened_and_what_to_do():
    url = "http://h"
    unauthorized = status_error(anthropic.AuthenticationError, 401,
                                {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
    line = chat.describe_error(unauthorized, url)
    assert "401" in line and "invalid x-api-key" in line and "--api-key" in line
    bad = status_error(anthropic.BadRequestError, 400,
                       {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}})
    assert chat.describe_error(bad, url) == "the server answered 400: invalid_request_error: prompt is too long"
    refused = anthropic.APIConnectionError(request=httpx.Request("POST", url))
    refused.__cause__ = httpx.ConnectError("[Errno 111] Connection refused")
    line = chat.describe_error(refused, url)
    assert line.startswith("cannot reach http://h") and "Connection refused" in line
    assert "\n" not in line


def test_a_dead_url_is_one_line_and_exit_1(capsys):
    args = parse("--url", f"http://127.0.0.1:{free_port()}", "hello")
    assert chat.run(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("localvl chat: cannot reach http://127.0.0.1:") and captured.err.count("\n") == 1


def test_local_problems_fail_before_any_request(capsys, tmp_path):
    assert main(["chat", "--url", "http://127.0.0.1:1", "--image", str(tmp_path / "gone.png"), "hi"]) == 1
    assert capsys.readouterr().err == f"localvl chat: image {tmp_path / 'gone.png'}: no such file\n"
    assert main(["chat", "--max-tokens", "0", "hi"]) == 1
    assert "--max-tokens" in capsys.readouterr().err
    args = parse("--url", "http://127.0.0.1:1")
    assert chat.run(args, stdin=io.StringIO("  \n")) == 1  # piped, but empty
    assert "no question" in capsys.readouterr().err


# -- the session, against a fake client ---------------------------------------------------------


def delta(kind: str, text: str) -> SimpleNamespace:
    field = "text" if kind == "text_delta" else "thinking"
    return SimpleNamespace(type="content_block_delta", delta=SimpleNamespace(type=kind, **{field: text}))


class FakeStream:
    def __init__(self, events, content, interrupt_after=None):
        self.events, self.content, self.interrupt_after = events, content, interrupt_after
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True

    def __iter__(self):
        for i, event in enumerate(self.events):
            if i == self.interrupt_after:
                raise KeyboardInterrupt
            yield event

    def get_final_message(self):
        usage = SimpleNamespace(input_tokens=5, cache_creation_input_tokens=0, cache_read_input_tokens=16, output_tokens=3)
        return SimpleNamespace(content=self.content, usage=usage, stop_reason="end_turn")


class FakeClient:
    """Answers each request with the next scripted stream and keeps the requests."""

    def __init__(self, *streams: FakeStream):
        self.streams, self.requests = list(streams), []
        self.messages = self

    def stream(self, **request):
        self.requests.append(request)
        return self.streams.pop(0)


def text_answer(*chunks: str, interrupt_after=None) -> FakeStream:
    block = SimpleNamespace(type="text", text="".join(chunks))
    return FakeStream([SimpleNamespace(type="message_start")] + [delta("text_delta", c) for c in chunks],
                      [block], interrupt_after)


class RecordingOut(io.StringIO):
    """Notes what had been written at each flush: proof that text goes out as it arrives."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self):
        self.flushed.append(self.getvalue())


def session(client, out=None, **kw) -> chat.Session:
    return chat.Session(client, "m", 16, chat.Terminal(out or io.StringIO(), io.StringIO(), color=False), **kw)


def test_each_text_delta_is_written_and_flushed_as_it_arrives():
    out = RecordingOut()
    s = session(FakeClient(text_answer("Hel", "lo", "!")), out, system="sys")
    answer = s.ask("hi")
    assert out.flushed[:3] == ["Hel", "Hello", "Hello!"] and out.getvalue() == "Hello!\n"
    assert answer.ttft is not None and answer.content == [{"type": "text", "text": "Hello!"}]
    assert s.client.requests[0]["system"] == "sys" and s.client.requests[0]["max_tokens"] == 16


def test_thinking_is_marked_when_not_a_terminal_and_dimmed_on_one():
    thinking = SimpleNamespace(type="thinking", thinking="hmm", signature="sig")
    stream = FakeStream([delta("thinking_delta", "hmm"), delta("text_delta", "Yes")],
                        [thinking, SimpleNamespace(type="text", text="Yes")])
    s = session(FakeClient(stream))
    answer = s.ask("q")
    assert s.terminal.out.getvalue() == "[thinking]\nhmm\n[/thinking]\nYes\n"
    # thinking goes back with its signature, so the server can check it next turn
    assert answer.content[0] == {"type": "thinking", "thinking": "hmm", "signature": "sig"}
    stream.events = [delta("thinking_delta", "hmm"), delta("text_delta", "Yes")]
    dimmed = chat.Terminal(io.StringIO(), io.StringIO(), color=True)
    chat.stream_answer(FakeClient(stream), {}, dimmed)
    assert dimmed.out.getvalue() == "\x1b[2mhmm\x1b[0m\nYes\n"


def test_a_session_keeps_history_attaches_files_and_resets(tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(image_bytes())
    client = FakeClient(text_answer("one"), text_answer("two"), text_answer("three"))
    s = session(client)
    lines = iter(["first", f"/image {picture}", "second", "/reset", "third", "/exit", "never read"])
    assert s.run(lambda prompt: next(lines), "http://h") == 0
    first, second, third = (r["messages"] for r in client.requests)
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == [{"type": "text", "text": "one"}]
    assert [part["type"] for part in second[2]["content"]] == ["image", "text"]
    assert len(third) == 1 and third[0]["content"] == [{"type": "text", "text": "third"}]  # /reset forgot
    assert "p.png will go with your next message" in s.terminal.err.getvalue()


def test_ctrl_c_cancels_the_answer_not_the_session_and_ctrl_d_ends_it():
    cut = text_answer("a", "b", "c", interrupt_after=2)
    client = FakeClient(cut, text_answer("ok"))
    s = session(client)
    inputs = ["first", "second"]

    def read(prompt):
        if not inputs:
            raise EOFError  # Ctrl-D
        return inputs.pop(0)

    assert s.run(read, "http://h") == 0
    assert cut.closed  # the stream (and its HTTP response) was closed
    assert "(answer cancelled)" in s.terminal.err.getvalue()
    # the cancelled turn is not in the history: the next request starts afresh
    assert [m["role"] for m in client.requests[1]["messages"]] == ["user"]
    assert s.history[-1] == {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}


def test_a_failed_request_is_a_line_and_the_session_goes_on(tmp_path):
    class Failing(FakeClient):
        def stream(self, **request):
            if not self.requests:
                self.requests.append(request)
                raise status_error(anthropic.BadRequestError, 400, {"type": "error", "error": {
                    "type": "invalid_request_error", "message": "prompt is too long: 99 tokens > 64 maximum"}})
            return super().stream(**request)

    s = session(Failing(text_answer("fine")), verbose=True)
    lines = iter(["too long", f"/image {tmp_path / 'none.png'}", "/pdf", "ok"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert s.run(read, "http://h") == 0
    err = s.terminal.err.getvalue()
    assert "localvl chat: the server answered 400: invalid_request_error: prompt is too long" in err
    assert "none.png: no such file" in err and "usage: /pdf PATH" in err
    assert "[prompt 21 tokens (16 from cache), output 3 tokens" in err  # --verbose
