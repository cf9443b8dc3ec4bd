"""Settings: init kwargs > LOCALVL_* environment > TOML config file > defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from localvl.settings import DEFAULT_ALIAS, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.upper().startswith("LOCALVL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config_file(tmp_path):
    def write(text: str, name: str = "localvl.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


# ----------------------------------------------------------------------------- defaults


def test_defaults():
    settings = Settings()
    assert settings.config is None
    assert settings.model is None
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.api_key == []
    assert settings.alias == [DEFAULT_ALIAS]
    assert settings.device == "auto"


# ----------------------------------------------------------------------------- environment


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("LOCALVL_PORT", "9001")
    monkeypatch.setenv("LOCALVL_HOST", "0.0.0.0")
    settings = Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 9001)


def test_api_key_from_environment_is_comma_separated(monkeypatch):
    monkeypatch.setenv("LOCALVL_API_KEY", "key-one, key-two,,key-three ")
    assert Settings().api_key == ["key-one", "key-two", "key-three"]


def test_alias_from_environment_is_comma_separated(monkeypatch):
    monkeypatch.setenv("LOCALVL_ALIAS", "claude-*,gpt-4o=qwen")
    assert Settings().alias == ["claude-*", "gpt-4o=qwen"]


def test_single_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("LOCALVL_API_KEY", "only")
    assert Settings().api_key == ["only"]


def test_empty_api_key_from_environment_means_none(monkeypatch):
    monkeypatch.setenv("LOCALVL_API_KEY", "")
    assert Settings().api_key == []


def test_invalid_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv("LOCALVL_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        Settings()


def test_out_of_range_value_is_an_error():
    with pytest.raises(ValidationError):
        Settings(port=70000)


# ----------------------------------------------------------------------------- init kwargs


def test_init_kwargs_override_environment(monkeypatch):
    monkeypatch.setenv("LOCALVL_PORT", "9001")
    monkeypatch.setenv("LOCALVL_API_KEY", "from-env")
    settings = Settings(port=7000, api_key=["from-init"])
    assert settings.port == 7000
    assert settings.api_key == ["from-init"]


def test_init_kwargs_accept_a_comma_separated_string():
    assert Settings(api_key="a,b").api_key == ["a", "b"]


def test_unknown_init_kwarg_is_an_error():
    with pytest.raises(ValidationError):
        Settings(no_such_setting=1)


# ----------------------------------------------------------------------------- config file


def test_config_file_overrides_defaults(config_file):
    path = config_file('port = 1234\nhost = "10.0.0.1"\napi_key = ["k1", "k2"]\nalias = ["x-*"]\n')
    settings = Settings(config=path)
    assert settings.config == path
    assert (settings.host, settings.port) == ("10.0.0.1", 1234)
    assert settings.api_key == ["k1", "k2"]
    assert settings.alias == ["x-*"]


def test_config_file_list_may_be_a_comma_separated_string(config_file):
    assert Settings(config=config_file('api_key = "a, b"\n')).api_key == ["a", "b"]


def test_config_file_named_by_environment(monkeypatch, config_file):
    monkeypatch.setenv("LOCALVL_CONFIG", str(config_file("port = 4321\n")))
    assert Settings().port == 4321


def test_config_kwarg_wins_over_config_environment(monkeypatch, config_file):
    monkeypatch.setenv("LOCALVL_CONFIG", str(config_file("port = 1111\n", "env.toml")))
    assert Settings(config=config_file("port = 2222\n", "kwarg.toml")).port == 2222


def test_environment_overrides_config_file(monkeypatch, config_file):
    monkeypatch.setenv("LOCALVL_PORT", "5555")
    monkeypatch.setenv("LOCALVL_API_KEY", "env-key")
    settings = Settings(config=config_file('port = 1234\napi_key = ["file-key"]\nhost = "file-host"\n'))
    assert settings.port == 5555
    assert settings.api_key == ["env-key"]
    assert settings.host == "file-host"  # not set in the environment: the file still counts


def test_init_kwargs_override_environment_and_config_file(monkeypatch, config_file):
    monkeypatch.setenv("LOCALVL_PORT", "5555")
    assert Settings(config=config_file("port = 1234\n"), port=6666).port == 6666


def test_unknown_key_in_config_file_is_an_error(config_file):
    path = config_file("port = 1234\nno_such_setting = true\n")
    with pytest.raises(ValueError, match="no_such_setting"):
        Settings(config=path)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Settings(config=tmp_path / "missing.toml")


def test_missing_config_file_named_by_environment_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALVL_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError):
        Settings()


def test_config_path_that_is_a_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        Settings(config=tmp_path)


def test_invalid_toml_is_an_error(config_file):
    with pytest.raises(ValueError):
        Settings(config=config_file("port = = 3\n"))


def test_invalid_value_in_config_file_is_an_error(config_file):
    with pytest.raises(ValidationError):
        Settings(config=config_file('port = "not-a-port"\n'))


def test_invalid_toml_names_the_file(config_file):
    path = config_file('port = "x\n')
    with pytest.raises(ValueError, match=str(path)):
        Settings(config=path)


# ----------------------------------------------------------------------------- values checked up front


def test_log_level_is_one_of_the_documented_ones_in_any_case():
    assert Settings(log_level="DEBUG").log_level == "debug"
    with pytest.raises(ValidationError, match="log_level"):
        Settings(log_level="verbose")


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"])
def test_every_dtype_the_loader_takes_is_accepted(dtype):
    assert Settings(dtype=dtype).dtype == dtype


def test_an_unknown_dtype_is_refused_before_loading():
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="int3")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_documented_devices_are_accepted(device):
    assert Settings(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", ""])
def test_an_unknown_device_is_refused_before_loading(device):
    with pytest.raises(ValidationError, match="device"):
        Settings(device=device)


def test_store_urls_with_async_drivers_are_taken_as_given():
    url = "postgresql+asyncpg://localvl:secret@db:5432/localvl"
    assert Settings(database_url=url, redis_url="rediss://cache:6380/1").database_url == url
    assert Settings(database_url="sqlite+aiosqlite:////var/lib/localvl/db").redis_url is None
    with pytest.raises(ValidationError, match="synchronous driver"):
        Settings(database_url="sqlite:////var/lib/localvl/db")
