"""URL/token resolution shared by the SDK and the CLI: precedence, the config file, bad input."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kiln.sdk.config import (
    DEFAULT_URL,
    load_settings,
    normalize_url,
    parse_config,
    read_config_file,
    resolve,
    write_config_file,
)
from kiln.sdk.errors import ConfigError

FILE = {"url": "http://file:1", "token": "file-token"}
ENV = {"KILN_URL": "http://env:2", "KILN_TOKEN": "env-token"}


def test_argument_beats_file_and_env() -> None:
    s = resolve(arg_url="http://arg:3", arg_token="arg-token", file=FILE, env=ENV)
    assert (s.url, s.token, s.url_source, s.token_source) == (
        "http://arg:3",
        "arg-token",
        "argument",
        "argument",
    )


def test_env_beats_file() -> None:
    s = resolve(arg_url=None, arg_token=None, file=FILE, env=ENV)
    assert (s.url, s.token, s.url_source, s.token_source) == (
        "http://env:2",
        "env-token",
        "KILN_URL",
        "KILN_TOKEN",
    )


def test_file_when_no_env() -> None:
    s = resolve(arg_url=None, arg_token=None, file=FILE, env={})
    assert (s.url, s.token, s.url_source) == ("http://file:1", "file-token", "config file")


def test_default_url_and_no_token() -> None:
    s = resolve(arg_url=None, arg_token=None, file={}, env={})
    assert (s.url, s.token, s.url_source) == (DEFAULT_URL, None, "default")


def test_url_and_token_resolve_independently() -> None:
    s = resolve(arg_url=None, arg_token="arg-token", file=FILE, env={"KILN_TOKEN": "env-token"})
    assert (s.url, s.url_source, s.token) == ("http://file:1", "config file", "arg-token")


def test_empty_values_fall_through() -> None:
    s = resolve(arg_url="", arg_token="", file=FILE, env={"KILN_URL": "", "KILN_TOKEN": ""})
    assert (s.url, s.token) == ("http://file:1", "file-token")


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://h:1/", "http://h:1"),
        (" https://kiln.example ", "https://kiln.example"),
    ],
)
def test_normalize_url(given: str, want: str) -> None:
    assert normalize_url(given) == want


@pytest.mark.parametrize("bad", ["ftp://h", "http://", "://x"])
def test_normalize_url_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid daemon URL"):
        normalize_url(bad)


def test_parse_config_ignores_unknown_keys() -> None:
    assert parse_config("url: http://x:1\ntoken: t\nother: 3\n") == {
        "url": "http://x:1",
        "token": "t",
    }
    assert parse_config("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "mapping"), ("url: [1]", "'url' must be a string"), ("url: 'x\n", "YAML")],
)
def test_parse_config_rejects(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_write_then_read_round_trip_with_private_modes(tmp_path: Path) -> None:
    path = tmp_path / "home" / ".kiln" / "config.yaml"
    assert write_config_file("127.0.0.1:9000", "kiln_secret", path) == path
    assert read_config_file(path) == {"url": "http://127.0.0.1:9000", "token": "kiln_secret"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_config_file(tmp_path / "nope.yaml") == {}


def test_load_settings_reads_home_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KILN_URL", "http://env:2")
    monkeypatch.setenv("KILN_TOKEN", "env-token")
    write_config_file("http://file:1", "file-token")
    s = load_settings()
    assert (s.url, s.token) == ("http://env:2", "env-token")
    monkeypatch.delenv("KILN_URL")
    monkeypatch.delenv("KILN_TOKEN")
    s = load_settings()
    assert (s.url, s.token) == ("http://file:1", "file-token")
    assert load_settings("http://arg:3").url == "http://arg:3"
