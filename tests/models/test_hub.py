"""Pulling, resolving and listing hub models against a fake hub on a local HTTP server.

The real clients (huggingface_hub, modelscope) do the downloading, pointed at the fake hub through
their own endpoint settings (HF_ENDPOINT, MODELSCOPE_ENDPOINT).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from localvl.cli import main
from localvl.models.hub import HubError, list_local, local_copy, pull, resolve_model
from localvl.models.loader import ModelLoadError, load_model
from tests.models.fake_hub import COMMIT, FakeHub, FakeHubServer

REPO = "Qwen/Tiny-VL"


@pytest.fixture
def hub(model_dir):
    fake = FakeHub()
    fake.add_folder(REPO, model_dir("qwen2_5_vl"))
    with FakeHubServer(fake) as url:
        fake.url = url
        yield fake


@pytest.fixture
def online(tmp_path, monkeypatch, hub):
    """Caches under tmp_path, both endpoints at the fake hub, offline mode off (conftest turns it on)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stored hub credentials
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    return tmp_path


def snapshot(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "models--Qwen--Tiny-VL" / "snapshots" / COMMIT


def same_files(folder: Path, original: Path) -> bool:
    names = sorted(str(p.relative_to(original)) for p in original.rglob("*") if p.is_file())
    return all(hashlib.sha256((folder / n).read_bytes()).digest() == hashlib.sha256((original / n).read_bytes()).digest()
               for n in names)


def cli(capfd, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- Hugging Face


def test_pull_downloads_verifies_shows_progress_and_prints_where_it_lives(online, hub, model_dir, capfd):
    code, out, err = cli(capfd, "pull", REPO)
    assert code == 0, err
    assert out.strip() == str(snapshot(online))
    assert same_files(snapshot(online), model_dir("qwen2_5_vl"))
    assert "Fetching 9 files" in err and "Verifying" in err and "100%" in err  # progress bars on stderr
    assert local_copy(REPO) == snapshot(online)

    code, out, err = cli(capfd, "models")
    assert code == 0
    line = next(line for line in out.splitlines() if REPO in line)
    size = sum(p.stat().st_size for p in model_dir("qwen2_5_vl").rglob("*") if p.is_file())
    assert line.split()[0] == "huggingface" and COMMIT[:12] in line and "(main)" in line and "qwen2_5_vl" in line
    assert f"{size / 1e6:.1f} MB" in line and str(snapshot(online)) in line


def test_an_interrupted_file_resumes_from_where_it_stopped(online, hub, model_dir, monkeypatch, capfd):
    import huggingface_hub.constants

    # the client writes what it receives in chunks (10 MB); the tiny weights need small ones to resume mid-file
    chunk = 64 << 10
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    weights = (model_dir("qwen2_5_vl") / "model.safetensors").stat().st_size
    hub.cut_once.add("model.safetensors")
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 0, err
    # the whole file was asked for, the connection dropped halfway, and only the rest was asked for again
    assert hub.downloads("model.safetensors") == [None, f"bytes={weights // 2 // chunk * chunk}-"]
    assert same_files(snapshot(online), model_dir("qwen2_5_vl"))


def test_a_failed_pull_keeps_finished_files_and_a_rerun_fetches_only_the_rest(online, hub, capfd):
    hub.fail_get.add("tokenizer.json")
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 1 and "localvl pull: downloading Qwen/Tiny-VL from" in err and "500" in err
    assert local_copy(REPO) is None  # an incomplete snapshot is not a local copy
    hub.fail_get.clear()
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 0, err
    assert len(hub.downloads("tokenizer.json")) == 2 and len(hub.downloads("model.safetensors")) == 1


def test_wrong_bytes_fail_verification_and_are_not_kept(online, hub, model_dir, capfd):
    hub.corrupt.add("model.safetensors")
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 1
    assert "1 file(s) of Qwen/Tiny-VL failed verification and were deleted: model.safetensors (sha256" in err
    assert not (snapshot(online) / "model.safetensors").exists()
    assert not list((online / "hf" / "models--Qwen--Tiny-VL" / "blobs").glob(hub.repos[REPO]["model.safetensors"].sha256))
    assert local_copy(REPO) is None
    hub.corrupt.clear()
    assert cli(capfd, "pull", REPO)[0] == 0
    assert same_files(snapshot(online), model_dir("qwen2_5_vl"))


def test_a_text_file_with_a_wrong_git_hash_fails_verification(online, hub, capfd):
    hub.corrupt.add("config.json")
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 1 and "config.json (its git hash differs from the hub's)" in err
    assert not (snapshot(online) / "config.json").exists()


def test_a_wrong_size_is_refused_and_nothing_is_kept(online, hub, capfd):
    hub.short.add("model.safetensors")
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 1 and "arrived with the wrong size" in err and "Nothing wrong was kept" in err
    assert not (snapshot(online) / "model.safetensors").exists()


@pytest.mark.parametrize(
    "status, message",
    [
        (404, "Qwen/Tiny-VL was not found on http://127.0.0.1:\\d+ \\(HF_ENDPOINT\\) \\(HTTP 404\\). Check the spelling"),
        (401, "was not found .*\\(HTTP 401\\).*If it is private, log in \\(`hf auth login`, or set HF_TOKEN\\)"),
        (403, "Qwen/Tiny-VL is gated on .*accept its licence on the model's page, then log in"),
    ],
)
def test_hub_refusals_say_what_to_do(online, hub, capfd, status, message):
    hub.status[REPO] = status
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 1
    assert __import__("re").search(message, err), err


def test_a_hub_that_cannot_be_reached_suggests_a_mirror_and_modelscope(online, monkeypatch, capfd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    code, _, err = cli(capfd, "pull", REPO)
    assert code == 1
    assert f"could not reach {dead} (HF_ENDPOINT) to download Qwen/Tiny-VL" in err
    assert "HF_ENDPOINT=https://hf-mirror.com" in err and "--source modelscope" in err


def test_not_a_hub_id_is_refused(online):
    with pytest.raises(HubError, match="not a hub id"):
        pull("no-slash")


# ----------------------------------------------------------------------------- resolution


def test_serve_resolution_uses_the_local_copy_offline(online, hub, monkeypatch, capfd):
    import huggingface_hub.constants

    assert cli(capfd, "pull", REPO)[0] == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.log)
    assert resolve_model(REPO) == snapshot(online)
    assert len(hub.log) == requests  # no network
    assert resolve_model(str(snapshot(online))) == snapshot(online)  # a folder is itself


def test_a_missing_model_offline_says_what_was_tried_and_how_to_pull(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as caught:
        resolve_model(REPO)
    message = str(caught.value)
    assert f"looked in {online / 'hf'}" in message and "HF_HUB_OFFLINE is set" in message
    assert "`localvl pull Qwen/Tiny-VL`" in message and "HF_ENDPOINT=https://hf-mirror.com" in message
    assert "--source modelscope" in message


def test_a_missing_model_online_is_pulled(online, hub, capfd):
    assert resolve_model(REPO) == snapshot(online)
    assert "Qwen/Tiny-VL is not on this machine; pulling it from the Hugging Face hub" in capfd.readouterr().err


def test_a_missing_model_that_cannot_be_pulled_says_both(online, hub):
    hub.status[REPO] = 404
    with pytest.raises(HubError, match="is not on this machine \\(looked in .*\\) and could not be downloaded: .*not found"):
        resolve_model(REPO)


def test_a_pulled_text_model_is_refused_at_load(online, hub, model_dir, tmp_path):
    text = tmp_path / "text-model"
    text.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (text / name).write_bytes((model_dir("qwen2_5_vl") / name).read_bytes())
    (text / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    hub.add_folder("Qwen/Qwen2.5-0.5B-Instruct", text)
    folder = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ModelLoadError, match="is a text model \\('qwen2'\\); localvl serves Qwen-VL"):
        load_model(str(folder))


# ----------------------------------------------------------------------------- ModelScope


def test_modelscope_pull_resolve_and_listing(online, hub, model_dir, capfd):
    code, out, err = cli(capfd, "pull", REPO, "--source", "modelscope")
    assert code == 0, err
    folder = Path(out.strip())
    assert folder.is_relative_to(online / "ms") and same_files(folder, model_dir("qwen2_5_vl"))
    assert "Downloading" in err and "100%" in err
    assert hub.downloads("model.safetensors") and all("/api/v1/models/Qwen/Tiny-VL" in p for _, p, _ in hub.log
                                                       if "FilePath" in p)
    assert resolve_model(REPO, "modelscope") == folder
    assert local_copy(REPO, "huggingface") is None
    found = [m for m in list_local() if m.source == "modelscope"]
    assert [(m.repo_id, m.revision, m.complete, m.model_type) for m in found] == [(REPO, "master", True, "qwen2_5_vl")]
    code, out, _ = cli(capfd, "models", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert {"source": "modelscope", "model": REPO} .items() <= rows[0].items()


def test_an_interrupted_modelscope_pull_is_not_a_local_copy(online, hub, capfd):
    hub.fail_get.add("tokenizer.json")
    code, _, err = cli(capfd, "pull", REPO, "--source", "modelscope")
    assert code == 1 and "ModelScope" in err
    assert local_copy(REPO, "modelscope") is None
    assert [m.complete for m in list_local() if m.source == "modelscope"] == [False]


def test_modelscope_unknown_repo(online, hub, capfd):
    code, _, err = cli(capfd, "pull", "Qwen/Nope", "--source", "modelscope")
    assert code == 1 and "Qwen/Nope was not found on ModelScope" in err


def test_modelscope_missing_package_says_how_to_install(online, monkeypatch):
    for name in [n for n in sys.modules if n == "modelscope" or n.startswith("modelscope.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(HubError, match="pip install 'localvl\\[modelscope\\]'"):
        pull(REPO, "modelscope")


# ----------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_pulls_a_missing_hub_id_then_serves_it(online, hub, tmp_path):
    port = free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "localvl", "serve", "--model", REPO, "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--kv-cache-memory", str(32 << 20)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        output = (tmp_path / "serve.log").read_text(errors="replace")
        assert process.poll() is None, output
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]][:1] == [REPO]
        assert "pulling it from the Hugging Face hub" in output and "Loading weights" in output
        assert snapshot(online).is_dir()
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_serve_offline_without_the_model_fails_with_the_message(online, tmp_path, monkeypatch):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "localvl", "serve", "--model", REPO],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "localvl serve: Qwen/Tiny-VL is not on this machine" in result.stderr
    assert "localvl pull Qwen/Tiny-VL" in result.stderr


@pytest.mark.parametrize("layout", [("hub", "models", "Qwen", "Tiny-VL-2___5"), ("models", "Qwen", "Tiny-VL-2___5"),
                                    ("hub", "Qwen", "Tiny-VL-2.5"), ("Qwen", "Tiny-VL-2.5")])
def test_a_model_an_older_modelscope_client_left_is_listed_and_served_offline(tmp_path, monkeypatch, model_dir, capfd, layout):
    import shutil

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    folder = tmp_path.joinpath("ms", *layout)
    shutil.copytree(model_dir("qwen2_5_vl"), folder)
    repo = "Qwen/Tiny-VL-2.5"
    found = [m for m in list_local() if m.source == "modelscope"]
    assert [(m.repo_id, m.path, m.complete, m.model_type) for m in found] == [(repo, folder, True, "qwen2_5_vl")]
    assert resolve_model(repo, "modelscope", download=False) == folder
    # a revision asked for is not one an older client's folder can be said to hold
    with pytest.raises(HubError, match="is not on this machine"):
        resolve_model(repo, "modelscope", "v1.0", download=False)
    code, out, _ = cli(capfd, "models")
    assert code == 0 and repo in out and str(folder) in out and "incomplete" not in out

    (folder / "model.safetensors").unlink()  # an interrupted download: not served, listed as incomplete
    assert [m.complete for m in list_local() if m.source == "modelscope"] == [False]
    with pytest.raises(HubError, match="is not on this machine"):
        resolve_model(repo, "modelscope", download=False)


def test_a_sharded_legacy_folder_is_whole_only_with_every_shard(tmp_path):
    from localvl.models.hub.modelscope import weights_complete

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not weights_complete(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert weights_complete(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    assert not weights_complete(tmp_path)
