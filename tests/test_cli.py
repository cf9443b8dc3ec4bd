import json
import subprocess
import sys

import httpx
import pytest

from localvl.cli import main
from tests.e2e.conftest import free_port


def test_tiny_model_command_builds_a_loadable_folder(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m"), "--family", "qwen3_vl", "--seed", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "localvl-tiny.json").read_text())
    assert meta["family"] == "qwen3_vl" and meta["vocab"] == "tiny" and meta["seed"] == 5
    from localvl.models.loader import load_model

    assert load_model(str(tmp_path / "m")).model_type == "qwen3_vl"


def test_bad_flags_and_settings_exit_with_a_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--port", "eighty"])
    assert caught.value.code == 2
    assert main(["serve", "--port", "99999"]) == 2
    assert "port" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    # values the model loader or logging would only have choked on later, with a traceback
    for flag, value in (("--log-level", "verbose"), ("--dtype", "bogus"), ("--device", "gpu")):
        assert main(["serve", flag, value]) == 2
        assert flag.removeprefix("--").replace("-", "_") in capsys.readouterr().err


def test_an_unservable_model_exits_1_with_the_reason(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nothing")]) == 1
    assert "is neither a folder nor a hub id" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--model", str(tmp_path / "empty")]) == 1
    assert "has no config.json: it is not a model folder" in capsys.readouterr().err


def test_model_loading_flags_reach_the_settings(monkeypatch):
    from localvl.settings import Settings

    captured = {}
    monkeypatch.setattr("localvl.cli.serve", lambda flags: captured.update(Settings(**flags).model_dump()) or 0)
    assert main(["serve", "--model-source", "modelscope", "--attention", "eager", "--quantize", "4bit",
                 "--min-pixels", "3136", "--max-pixels", "200704"]) == 0
    assert (captured["model_source"], captured["attention"], captured["quantize"]) == ("modelscope", "eager", "4bit")
    assert (captured["min_pixels"], captured["max_pixels"]) == (3136, 200704)
    with pytest.raises(SystemExit):
        main(["serve", "--quantize", "3bit"])


def test_pull_and_models_start_without_torch(tmp_path):
    code = ("import sys; from localvl.cli import main; code = main(['models']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "no models on disk; get one with: localvl pull" in result.stderr


def test_serve_without_a_model_serves_the_demo_and_says_so(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "localvl", "serve", "--port", str(port), "--cache-dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                if process.poll() is not None:
                    break
            import time

            time.sleep(0.1)
        assert health.json()["model"] == "localvl-demo"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert models["data"][0]["id"] == "localvl-demo"
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "DEMO model" in output and "RANDOM" in output and "--model" in output
    assert (tmp_path / "demo-qwen2_5_vl-v1" / "model.safetensors").is_file()


def test_flags_beat_the_environment(monkeypatch, tmp_path):
    from localvl.settings import Settings

    monkeypatch.setenv("LOCALVL_PORT", "9100")
    monkeypatch.setenv("LOCALVL_API_KEY", "env-key")
    captured = {}

    def fake_serve(flags):
        captured.update(Settings(**flags).model_dump())
        return 0

    monkeypatch.setattr("localvl.cli.serve", fake_serve)
    assert main(["serve", "--api-key", "a", "--api-key", "b", "--alias", "gpt-*"]) == 0
    assert captured["port"] == 9100 and captured["api_key"] == ["a", "b"] and captured["alias"] == ["gpt-*"]


def test_engine_flags_reach_the_engine_config(monkeypatch):
    from localvl.cli import engine_config
    from localvl.settings import Settings

    monkeypatch.setenv("LOCALVL_MAX_QUEUE", "7")
    captured = {}

    def fake_serve(flags):
        captured["config"] = engine_config(Settings(**flags))
        return 0

    monkeypatch.setattr("localvl.cli.serve", fake_serve)
    flags = ["serve", "--max-num-seqs", "8", "--max-batch-tokens", "512", "--block-size", "32",
             "--kv-cache-memory", "1000000", "--image-cache-memory", "0", "--no-cuda-graphs"]
    assert main(flags) == 0
    config = captured["config"]
    assert (config.max_num_seqs, config.max_batch_tokens, config.block_size) == (8, 512, 32)
    assert (config.kv_cache_memory, config.image_cache_memory, config.cuda_graphs, config.max_queue) == (1000000, 0, False, 7)


def test_a_public_address_without_a_key_is_refused_unless_asked_for(capsys, tmp_path):
    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "nothing")]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err
    # with a key, or with the explicit flag, it goes on (to the model, which is missing here: exit 1)
    assert main(["serve", "--host", "0.0.0.0", "--api-key", "k", "--model", str(tmp_path / "nothing")]) == 1
    assert main(["serve", "--host", "0.0.0.0", "--insecure-no-auth", "--model", str(tmp_path / "nothing")]) == 1
    assert main(["serve", "--host", "::1", "--model", str(tmp_path / "nothing")]) == 1  # loopback needs no key


def test_cache_dir_setting_reaches_what_reads_the_environment(monkeypatch, tmp_path):
    from localvl.models.tiny import default_cache_dir

    monkeypatch.setenv("LOCALVL_CACHE_DIR", str(tmp_path / "from-env"))  # restored after the test
    assert main(["serve", "--cache-dir", str(tmp_path / "flag"), "--model", str(tmp_path / "nothing")]) == 1
    assert default_cache_dir() == tmp_path / "flag"


@pytest.mark.parametrize("name", ["compile", "insecure_no_auth", "response_cache_shared", "cuda_graphs"])
def test_every_switch_can_be_turned_off_by_a_flag_over_the_environment(monkeypatch, name):
    from localvl.settings import Settings

    monkeypatch.setenv(f"LOCALVL_{name.upper()}", "true")
    captured = {}
    monkeypatch.setattr("localvl.cli.serve", lambda flags: captured.update(Settings(**flags).model_dump()) or 0)
    assert main(["serve", "--no-" + name.replace("_", "-")]) == 0
    assert captured[name] is False


def test_unusable_jwt_settings_are_refused_before_the_model_loads(tmp_path, capsys):
    missing = str(tmp_path / "nothing")  # a model that would fail to load (exit 1) if asked for first
    assert main(["serve", "--model", missing, "--jwt-secret", "too short"]) == 2
    assert "--jwt-secret" in capsys.readouterr().err
    assert main(["serve", "--model", missing, "--jwt-jwks-file", str(tmp_path / "absent.json")]) == 2
    assert "JWKS" in capsys.readouterr().err


@pytest.mark.parametrize("flag,url", [
    ("--database-url", "postgresql://localvl:hunter2@db/localvl"),  # psycopg: not an async driver
    ("--database-url", "mysql+aiomysql://localvl:hunter2@db/localvl"),  # a driver not installed
    ("--database-url", "hunter2 is not a URL"),
    ("--redis-url", "http://:hunter2@cache:6379/0"),
])
def test_an_unusable_store_url_is_refused_at_start_without_printing_it(tmp_path, capsys, flag, url):
    # Before, the server started and every request that needed the store was a 500.
    assert main(["serve", "--model", str(tmp_path / "nothing"), flag, url]) == 2
    err = capsys.readouterr().err
    assert flag.removeprefix("--").replace("-", "_") in err
    assert "hunter2" not in err  # the URL's password stays out of the terminal and the service's log
    if flag == "--database-url":
        assert main(["keys", "list", flag, url]) == 2
        err = capsys.readouterr().err
        assert "database_url" in err and "hunter2" not in err
