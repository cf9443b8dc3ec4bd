"""The real ``localvl chat`` in a subprocess against a real server. The model is tiny and random:
these tests check mechanics (requests made, output streamed, history kept, errors reported), never
wording."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import API_KEY, free_port
from tests.helpers import image_bytes, pdf_bytes

USAGE = re.compile(r"\[prompt (\d+) tokens \((\d+) from cache\), output (\d+) tokens, .*stop (\w+)\]")


def chat_env(url: str | None, key: str | None = API_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCALVL_URL", "LOCALVL_API_KEY", "ANTHROPIC_API_KEY",
                                                             "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL")}
    if url:
        env["LOCALVL_URL"] = url
    if key:
        env["LOCALVL_API_KEY"] = key
    return env


def chat(*argv: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localvl", "chat", *argv], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def usages(stderr: str) -> list[tuple[int, int, int, str]]:
    return [(int(a), int(b), int(c), d) for a, b, c, d in USAGE.findall(stderr)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chat-files")
    made = {"png": ("photo.png", image_bytes("PNG")), "jpeg": ("photo.jpg", image_bytes("JPEG")),
            "pdf": ("invoice.pdf", pdf_bytes(["Invoice 4711: total 99 EUR", "page two"])),
            "text": ("notes.png", b"just text, not an image"), "broken_pdf": ("broken.pdf", b"%PDF-1.4 broken")}
    paths = {}
    for key, (name, data) in made.items():
        paths[key] = folder / name
        paths[key].write_bytes(data)
    return paths


def test_one_question_with_an_image_and_a_pdf(server, files):
    env = chat_env(server.url)  # the URL and the key from the environment, the model from /v1/models
    plain = chat("-v", "--max-tokens", "4", "What is in these files?", env=env)
    attached = chat("-v", "--max-tokens", "4", "--image", str(files["png"]), "--image", str(files["jpeg"]),
                    "--pdf", str(files["pdf"]), "--system", "Answer briefly.", "What is in these files?", env=env)
    assert plain.returncode == 0 and attached.returncode == 0, attached.stderr
    assert "Traceback" not in attached.stderr
    (plain_prompt, _, _, _), = usages(plain.stderr)
    (prompt, _, output, stop), = usages(attached.stderr)
    assert prompt > plain_prompt + 2 * 4  # two images and two rendered pages are in the prompt
    assert 1 <= output <= 4 and stop in ("end_turn", "max_tokens")


def test_the_answer_streams_to_stdout(server):
    process = subprocess.Popen([sys.executable, "-m", "localvl", "chat", "-v", "--max-tokens", "300", "--url", server.url,
                                "--api-key", API_KEY, "--model", "tiny-vl", "Tell a long story."],
                               env=chat_env(None, None), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reads: list[bytes] = []

    def drain() -> None:
        while chunk := os.read(process.stdout.fileno(), 65536):
            reads.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    reader.join(timeout=10)
    (_, _, output, stop), = usages(stderr)
    text = b"".join(reads).decode()
    assert text.endswith("\n")
    if output > 1:
        assert text.strip()  # the answer's text reached the terminal
    if output >= 100:  # a long answer arrives in pieces, not in one write at the end
        assert len(reads) > 1, (output, stop)


def test_an_interactive_session_keeps_history_and_attaches(server, files):
    script = f"First question\n/image {files['png']}\nSecond question\n/exit\nnot asked\n"
    run = chat("-i", "-v", "--max-tokens", "4", env=chat_env(server.url), stdin=script)
    assert run.returncode == 0, run.stderr
    first, second = usages(run.stderr)  # two answers, and "not asked" never sent
    # the second prompt holds the first question, its answer, the image and the second question
    assert second[0] > first[0] + 4
    assert "photo.png will go with your next message" in run.stderr


def test_piped_stdin_is_the_question(server):
    run = chat("-v", "--max-tokens", "3", env=chat_env(server.url), stdin="What does this log line mean?\n")
    assert run.returncode == 0, run.stderr
    assert len(usages(run.stderr)) == 1


def test_ctrl_c_stops_the_answer_but_not_the_session(server):
    process = subprocess.Popen([sys.executable, "-m", "localvl", "chat", "-i", "-v", "--max-tokens", "3000"],
                               env=chat_env(server.url), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdin.write(b"Tell a very long story.\n")
    process.stdin.flush()
    os.read(process.stdout.fileno(), 1)  # the answer has begun
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    try:  # another question, then end of input (Ctrl-D)
        stdout, stderr = process.communicate(b"And now a short one.\n", timeout=120)
    finally:
        process.kill()
    stderr = stderr.decode()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    answered = usages(stderr)
    # Usually the interrupt lands mid-answer; a random model may have ended its answer first, and
    # then the interrupt lands at the prompt. Either way the session answers the next question.
    assert "(answer cancelled)" in stderr and len(answered) == 1 or len(answered) == 2, stderr


def test_a_wrong_key_is_one_clear_line(server):
    run = chat("--max-tokens", "4", "--model", "tiny-vl", "hi", env=chat_env(server.url, "sk-wrong"))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"localvl chat: {server.url} refused the API key (401") and "--api-key" in run.stderr
    no_key = chat("hi", env=chat_env(server.url, None))  # listing the models needs the key too
    assert no_key.returncode == 1 and "(401" in no_key.stderr


def test_a_dead_url_and_bad_files_are_one_clear_line(server, files):
    dead = f"http://127.0.0.1:{free_port()}"
    run = chat("--url", dead, "hi", env=chat_env(None))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"localvl chat: cannot reach {dead}") and run.stderr.count("\n") == 1
    wrong_type = chat("--image", str(files["text"]), "hi", env=chat_env(server.url))
    assert wrong_type.returncode == 1
    assert wrong_type.stderr == f"localvl chat: image {files['text']}: not a PNG, JPEG, GIF or WebP image\n"
    # looks like a PDF here, but the server cannot read it: its 400, as one line
    broken = chat("--pdf", str(files["broken_pdf"]), "hi", env=chat_env(server.url))
    assert broken.returncode == 1 and broken.stdout == "" and broken.stderr.count("\n") == 1
    assert broken.stderr.startswith("localvl chat: the server answered 400: invalid_request_error: ")
    assert "PDF could not be read" in broken.stderr
