"""``localvl chat``: ask a localvl server (or any Anthropic-compatible URL) from the terminal.

One question streams its answer and exits; without one, an interactive session keeps the history.
The official ``anthropic`` SDK does the talking, so what works here works for the user's own code.
This module is imported whenever ``localvl`` starts: it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_TOKENS = 1024
HELP = ("commands: /image PATH and /pdf PATH attach a file to your next message, /reset forgets the "
        "conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops the answer being written.")

# (magic prefix, offset, media type): enough to tell the four image types Anthropic's API accepts.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
)


class ChatError(Exception):
    """A problem to report as one line (no traceback) before exiting non-zero."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "chat",
        help="ask a running server a question, or chat with it",
        description="Stream an answer from a localvl server or any Anthropic-compatible URL. Without a "
        "question (and with stdin a terminal, or with -i) it starts an interactive session. " + HELP,
    )
    p.add_argument("question", nargs="?", help="the question; read from stdin when omitted and stdin is not a terminal")
    p.add_argument("--url", help=f"server base URL (env LOCALVL_URL, default {DEFAULT_URL})")
    p.add_argument("--model", help="model name (default: the first listed by GET /v1/models)")
    p.add_argument("--api-key", dest="api_key", help="API key (env LOCALVL_API_KEY, then ANTHROPIC_API_KEY)")
    p.add_argument("--image", action="append", default=[], type=Path, metavar="PATH",
                   help="attach a PNG, JPEG, GIF or WebP image (repeatable)")
    p.add_argument("--pdf", action="append", default=[], type=Path, metavar="PATH", help="attach a PDF (repeatable)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens in an answer (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--system", help="system prompt")
    p.add_argument("-i", "--interactive", action="store_true", help="start a session even when stdin is not a terminal")
    p.add_argument("-v", "--verbose", action="store_true", help="after each answer, print tokens and timings on stderr")
    p.set_defaults(run=run)


# -- attachments -------------------------------------------------------------------------------


def image_media_type(data: bytes) -> str | None:
    """The media type from the file's first bytes (never from its name), or None."""
    for magic, offset, media_type in _IMAGE_MAGIC:
        if data[offset:offset + len(magic)] == magic and (media_type != "image/webp" or data[:4] == b"RIFF"):
            return media_type
    return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ChatError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ChatError(f"{what} {path}: is a directory") from None
    except OSError as error:
        raise ChatError(f"{what} {path}: {error.strerror or error}") from None


def image_block(path: Path) -> dict[str, Any]:
    data = _read(path, "image")
    media_type = image_media_type(data)
    if media_type is None:
        raise ChatError(f"image {path}: not a PNG, JPEG, GIF or WebP image")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode()}}


def pdf_block(path: Path) -> dict[str, Any]:
    data = _read(path, "PDF")
    if not data.startswith(b"%PDF-"):
        raise ChatError(f"PDF {path}: not a PDF file")
    return {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                           "data": base64.b64encode(data).decode()}}


def user_content(text: str, attachments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Attachments before the question: the order Anthropic recommends for images and documents.
    return [*attachments, {"type": "text", "text": text}]


# -- settings from flags and environment ------------------------------------------------------


def resolve_url(flag: str | None) -> str:
    return (flag or os.environ.get("LOCALVL_URL") or DEFAULT_URL).rstrip("/")


def resolve_key(flag: str | None) -> str | None:
    """``--api-key``, else ``LOCALVL_API_KEY`` (its first key: the server reads it as a list), else
    ``ANTHROPIC_API_KEY``."""
    if flag:
        return flag
    local = [k.strip() for k in os.environ.get("LOCALVL_API_KEY", "").split(",") if k.strip()]
    return local[0] if local else os.environ.get("ANTHROPIC_API_KEY") or None


# -- errors ------------------------------------------------------------------------------------


def describe_error(error: BaseException, url: str) -> str:
    """One line for an SDK exception: what happened and, where it helps, what to do."""
    import anthropic

    if isinstance(error, anthropic.APITimeoutError):
        return f"{url} did not answer in time"
    if isinstance(error, anthropic.APIConnectionError):
        cause = error.__cause__ or error.__context__
        reason = _short(cause) if cause is not None else str(error)
        return f"cannot reach {url} ({reason}); is `localvl serve` running there? (--url or LOCALVL_URL)"
    if isinstance(error, anthropic.APIStatusError):
        message = _server_message(error)
        if error.status_code == 401:
            return (f"{url} refused the API key (401 {message}); give the right one with --api-key, "
                    "LOCALVL_API_KEY or ANTHROPIC_API_KEY")
        if error.status_code == 404 and "model" in message.lower():
            return f"the server has no such model (404 {message}); see GET {url}/v1/models"
        return f"the server answered {error.status_code}: {message}"
    if isinstance(error, anthropic.APIError):  # e.g. an error event in the middle of a stream
        return f"the server reported an error: {_server_message(error)}"
    return _short(error)


def _server_message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(inner, dict) and inner.get("message"):
            kind = inner.get("type")
            return f"{kind}: {inner['message']}" if kind else str(inner["message"])
    return getattr(error, "message", None) or str(error)


def _short(error: BaseException) -> str:
    # httpx wraps the socket error; the innermost one says it best ("Connection refused").
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# -- one answer --------------------------------------------------------------------------------


@dataclass
class Answer:
    content: list[dict[str, Any]] = field(default_factory=list)
    usage: Any = None
    stop_reason: str | None = None
    ttft: float | None = None
    seconds: float = 0.0


class Terminal:
    """Where answers go: text as it arrives; thinking dimmed on a terminal, marked otherwise."""

    def __init__(self, out: TextIO, err: TextIO, color: bool | None = None) -> None:
        self.out, self.err = out, err
        self.color = color if color is not None else _is_tty(out) and not os.environ.get("NO_COLOR")
        self._in_thinking = False
        self._started = False  # whether this answer wrote anything yet

    def text(self, chunk: str) -> None:
        self._end_thinking()
        self._started = True
        self.out.write(chunk)
        self.out.flush()

    def thinking(self, chunk: str) -> None:
        if not self._in_thinking:
            self.out.write("\x1b[2m" if self.color else "[thinking]\n")
            self._in_thinking = self._started = True
        self.out.write(chunk)
        self.out.flush()

    def end(self) -> None:
        self._end_thinking()
        if self._started:
            self.out.write("\n")
            self.out.flush()
        self._started = False

    def _end_thinking(self) -> None:
        if self._in_thinking:
            self.out.write("\x1b[0m\n" if self.color else "\n[/thinking]\n")
            self._in_thinking = False


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def stream_answer(client: Any, request: dict[str, Any], terminal: Terminal) -> Answer:
    """Send one request with streaming and write the answer as it arrives."""
    answer = Answer()
    started = time.monotonic()
    try:
        with client.messages.stream(**request) as stream:
            for event in stream:
                if event.type != "content_block_delta":
                    continue
                delta = event.delta
                if delta.type == "text_delta" and delta.text:
                    answer.ttft = answer.ttft if answer.ttft is not None else time.monotonic() - started
                    terminal.text(delta.text)
                elif delta.type == "thinking_delta" and delta.thinking:
                    answer.ttft = answer.ttft if answer.ttft is not None else time.monotonic() - started
                    terminal.thinking(delta.thinking)
            final = stream.get_final_message()
    finally:
        terminal.end()
    answer.seconds = time.monotonic() - started
    answer.usage, answer.stop_reason = final.usage, final.stop_reason
    answer.content = [block for block in (_history_block(b) for b in final.content) if block]
    return answer


def _history_block(block: Any) -> dict[str, Any] | None:
    # Only what the next request needs: text, and thinking with its signature (the server checks it).
    if block.type == "text" and block.text:
        return {"type": "text", "text": block.text}
    if block.type == "thinking":
        return {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
    return None


def usage_line(answer: Answer) -> str:
    usage = answer.usage
    # Anthropic splits the prompt three ways; the whole prompt is what a reader wants to see.
    cached = getattr(usage, "cache_read_input_tokens", None) or 0
    prompt = (getattr(usage, "input_tokens", 0) or 0) + (getattr(usage, "cache_creation_input_tokens", None) or 0) + cached
    parts = [f"prompt {prompt} tokens ({cached} from cache)"]
    output = getattr(usage, "output_tokens", 0) or 0
    parts.append(f"output {output} tokens")
    if answer.ttft is not None:
        parts.append(f"TTFT {answer.ttft:.2f} s")
        decoding = answer.seconds - answer.ttft
        if output > 1 and decoding > 0:
            parts.append(f"{(output - 1) / decoding:.1f} tokens/s")
    parts.append(f"{answer.seconds:.2f} s")
    parts.append(f"stop {answer.stop_reason}")
    return "[" + ", ".join(parts) + "]"


# -- the session -------------------------------------------------------------------------------


@dataclass
class Session:
    client: Any
    model: str
    max_tokens: int
    terminal: Terminal
    system: str | None = None
    verbose: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)  # attachments for the next message

    def ask(self, text: str) -> Answer:
        """Ask with the history so far; the turn joins the history only once answered."""
        turn = {"role": "user", "content": user_content(text, self.pending)}
        self.pending = []
        request: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                   "messages": [*self.history, turn]}
        if self.system:
            request["system"] = self.system
        answer = stream_answer(self.client, request, self.terminal)
        if answer.content:  # an empty assistant turn would be refused in the next request
            self.history += [turn, {"role": "assistant", "content": answer.content}]
        if self.verbose:
            print(usage_line(answer), file=self.terminal.err, flush=True)
        return answer

    def command(self, line: str) -> bool:
        """Run a ``/command``; False when the session should end."""
        name, _, rest = line.partition(" ")
        path = Path(os.path.expanduser(rest.strip().strip("'\""))) if rest.strip() else None
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history, self.pending = [], []
            self._note("(conversation forgotten)")
        elif name in ("/image", "/pdf"):
            if path is None:
                self._note(f"usage: {name} PATH")
            else:
                try:
                    self.pending.append(image_block(path) if name == "/image" else pdf_block(path))
                    self._note(f"({path.name} will go with your next message)")
                except ChatError as error:
                    self._note(f"localvl chat: {error}")
        else:
            self._note(HELP)
        return True

    def run(self, read_line: Callable[[str], str], url: str) -> int:
        """The interactive loop: ``read_line`` raises EOFError at the end and KeyboardInterrupt on Ctrl-C."""
        while True:
            try:
                line = read_line("> ").strip()
            except EOFError:
                return 0
            except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
                self._note("")
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            try:
                self.ask(line)
            except KeyboardInterrupt:
                self._note("(answer cancelled)")
            except _sdk_errors() as error:
                # The session survives a failed request (a 400 for a too-long prompt, a restarted server).
                self._note(f"localvl chat: {describe_error(error, url)}")

    def _note(self, text: str) -> None:
        print(text, file=self.terminal.err, flush=True)


def _sdk_errors() -> tuple[type[BaseException], ...]:
    import anthropic

    return (anthropic.APIError,)


# -- the command -------------------------------------------------------------------------------


def first_model(client: Any) -> str:
    page = client.models.list(limit=1)
    if not page.data:
        raise ChatError("the server lists no models; name one with --model")
    return page.data[0].id


def make_client(url: str, key: str | None) -> Any:
    import anthropic

    # An open localvl server needs no key, but the SDK refuses to send a request without one.
    return anthropic.Anthropic(base_url=url, api_key=key or "no-key")


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    url = resolve_url(args.url)
    try:
        if args.max_tokens < 1:
            raise ChatError("--max-tokens must be at least 1")
        attachments = [image_block(p) for p in args.image] + [pdf_block(p) for p in args.pdf]
        question = args.question
        interactive = question is None and (args.interactive or _is_tty(stdin))
        if question is None and not interactive:
            question = stdin.read().strip()
            if not question:
                raise ChatError("no question: give one as an argument, on stdin, or start a session with -i")
        client = make_client(url, resolve_key(args.api_key))
        session = Session(client, "", args.max_tokens, Terminal(stdout, stderr), args.system, args.verbose,
                          pending=attachments)
        session.model = args.model or first_model(client)
        if not interactive:
            session.ask(question)
            return 0
        print(f"localvl chat: {session.model} at {url}. {HELP}", file=stderr, flush=True)
        return session.run(_line_reader(stdin, stdout), url)
    except ChatError as error:
        print(f"localvl chat: {error}", file=stderr)
        return 1
    except KeyboardInterrupt:
        print("localvl chat: cancelled", file=stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the SDK's errors, reported as one line
        if not isinstance(error, _sdk_errors()):
            raise
        print(f"localvl chat: {describe_error(error, url)}", file=stderr)
        return 1


def _line_reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str]:
    if _is_tty(stdin) and stdin is sys.stdin:
        try:
            import readline  # noqa: F401 - gives input() line editing and history
        except ImportError:  # pragma: no cover - Windows
            pass
        return input

    def read(prompt: str) -> str:
        # Piped input: no prompt, so the output holds only the answers.
        line = stdin.readline()
        if not line:
            raise EOFError
        return line

    return read
