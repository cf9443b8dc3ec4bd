"""A real ``localvl serve`` in a subprocess, for the official SDKs to talk to."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-localvl-e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, "-m", "localvl", "serve", "--model", str(model), "--port", str(self.port),
                   "--api-key", API_KEY, "--served-model-name", "tiny-vl", "--data-dir", str(log.parent / f"data-{self.port}"),
                   *extra]
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def engine_pid(self) -> int:
        """The pid of the server's engine process (multiprocessing's spawn child)."""
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
        raise AssertionError("no engine process found")

    def peak_rss_bytes(self) -> int:
        """The server's peak resident memory, its engine process's included (the model lives there)."""
        pids = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        total = 0
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        if len(pids) < 2:
            raise RuntimeError("no engine process found")
        return total

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """qwen2_5_vl, tiny vocabulary; pings every 50 ms so tests can see them; image URLs may be on 127.0.0.1."""
    s = Server(model_dir("qwen2_5_vl"), tmp_path_factory.mktemp("logs") / "server.log", "--ping-interval", "0.05",
               "--log-level", "debug", "--url-allowlist", "127.0.0.1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def qwen_vocab_server(model_dir, tmp_path_factory):
    """qwen3_vl on the real Qwen vocabulary, so token counts are those of real Qwen models."""
    s = Server(model_dir("qwen3_vl", "qwen"), tmp_path_factory.mktemp("logs") / "server-qwen.log")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def small_context_server(model_dir, tmp_path_factory):
    s = Server(model_dir("qwen2_vl"), tmp_path_factory.mktemp("logs") / "server-small.log", "--max-model-len", "64")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def async_client(server):
    import anthropic

    return anthropic.AsyncAnthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def one_at_a_time_server(model_dir, tmp_path_factory):
    """One running request and one waiting at most: the rest are turned away."""
    s = Server(model_dir("qwen2_vl"), tmp_path_factory.mktemp("logs") / "server-busy.log",
               "--max-model-len", "64", "--max-num-seqs", "1", "--max-queue", "1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def thinking_server(model_dir, tmp_path_factory):
    """qwen3_vl, tiny vocabulary: a template with tools and <think>; its own signing key."""
    s = Server(model_dir("qwen3_vl"), tmp_path_factory.mktemp("logs") / "server-thinking.log",
               "--thinking-key", "e2e-thinking-key-0123456789")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def hybrid_server(model_dir, tmp_path_factory):
    """qwen3_5, tiny vocabulary: a hybrid decoder (Gated DeltaNet beside full attention), XML tool calls."""
    s = Server(model_dir("qwen3_5"), tmp_path_factory.mktemp("logs") / "server-hybrid.log")
    yield s
    s.stop()
