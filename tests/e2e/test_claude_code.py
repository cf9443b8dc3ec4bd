"""Claude Code (the real CLI, from npm) against localvl: a whole ``claude -p`` run, protocol-clean.

Claude Code sends ~19k-token prompts with its dozen tools, betas, ``?beta=true`` and
``context_management``. A random tiny model never ends its turn on purpose, so each answer is
capped with ``CLAUDE_CODE_MAX_OUTPUT_TOKENS`` and Claude Code may report that cap as its result:
what is checked is the protocol — every request it made was answered 200 and parsed, and the run
ended with a result rather than an API error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import API_KEY

VERSION = "2.1.197"


def claude_binary(cache: Path) -> Path | None:
    found = os.environ.get("LOCALVL_CLAUDE_BIN") or shutil.which("claude")
    if found:
        return Path(found)
    installed = cache / "node_modules" / ".bin" / "claude"
    if installed.exists():
        return installed
    if shutil.which("npm") is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(cache), f"@anthropic-ai/claude-code@{VERSION}"],
                   check=True, capture_output=True, timeout=600)
    return installed if installed.exists() else None


def message_statuses(log: str) -> list[int]:
    """The status of every POST /v1/messages in localvl's access log (one JSON line per request)."""
    entries = [json.loads(line.split("localvl.access: ", 1)[1]) for line in log.splitlines() if "localvl.access: " in line]
    return [e["status"] for e in entries if e.get("method") == "POST" and e.get("route") == "/v1/messages"]


def test_claude_code_print_mode_runs_against_localvl(qwen_vocab_server, tmp_path):
    binary = claude_binary(Path.home() / ".cache" / "localvl-tests" / "claude-code")
    if binary is None:
        pytest.skip("Claude Code is not installed and npm is not available to install it")
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = dict(os.environ, HOME=str(home), ANTHROPIC_BASE_URL=qwen_vocab_server.url, ANTHROPIC_API_KEY=API_KEY,
               DISABLE_TELEMETRY="1", DISABLE_AUTOUPDATER="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               CLAUDE_CODE_MAX_OUTPUT_TOKENS="48")
    before = len(message_statuses(qwen_vocab_server.log()))
    run = subprocess.run([str(binary), "-p", "Say hello", "--output-format", "json"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    result = json.loads(run.stdout)
    assert result["type"] == "result", run.stderr
    assert result.get("api_error_status") is None, result  # no request was refused
    assert not result["result"].startswith("API Error") or "output token maximum" in result["result"], result
    statuses = message_statuses(qwen_vocab_server.log())[before:]
    assert statuses and set(statuses) == {200}, statuses
    usage = result["usage"]
    assert usage["cache_read_input_tokens"] > 0  # later requests reused the long system prompt
