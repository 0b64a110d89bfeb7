"""Pure parsers behind the CLI options."""

from __future__ import annotations

import pytest

from kiln.api.requests import ALIAS_PATTERN as DAEMONS_ALIAS_PATTERN
from kiln.cli.args import (
    ALIAS_PATTERN,
    engine_for,
    parse_alias,
    parse_copy_location,
    parse_detach_key,
    parse_duration,
    parse_env,
    parse_labels,
    parse_mode,
    parse_new_volume,
    parse_session_command,
    parse_size_mb,
    parse_ttl,
    parse_volume,
)


def test_parse_alias_is_the_daemons_rule() -> None:
    assert ALIAS_PATTERN == DAEMONS_ALIAS_PATTERN
    for good in ("web", "my-app-3000", "0", "a" * 63):
        assert parse_alias(good) == good
    for bad in ("", "Web", "my_app", "-web", "web-", "a.b", "a" * 64):
        with pytest.raises(ValueError, match="invalid alias"):
            parse_alias(bad)


def test_parse_env() -> None:
    assert parse_env(["A=1", "B=x=y", "C=", "A=2"]) == {"A": "2", "B": "x=y", "C": ""}


@pytest.mark.parametrize("bad", ["A", "=1", "A\x00=1"])
def test_parse_env_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_env([bad])


def test_parse_volume() -> None:
    assert parse_volume("data:/mnt/data") == ("data", "/mnt/data")


@pytest.mark.parametrize("bad", ["data", "data:", ":/x", "data:rel", "bad name:/x"])
def test_parse_volume_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_volume(bad)


def test_parse_new_volume() -> None:
    assert parse_new_volume("cache:1G:/cache") == ("cache", 1024, "/cache")
    with pytest.raises(ValueError, match="NAME:SIZE:/MOUNT"):
        parse_new_volume("cache:/cache")


@pytest.mark.parametrize(
    ("text", "mib"),
    [("512", 512), ("512M", 512), ("512mb", 512), ("2G", 2048), ("1.5GiB", 1536), ("1T", 1 << 20)],
)
def test_parse_size_mb(text: str, mib: int) -> None:
    assert parse_size_mb(text) == mib


@pytest.mark.parametrize("bad", ["", "0", "x", "1.5", "100k", "-5"])
def test_parse_size_mb_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size_mb(bad)


@pytest.mark.parametrize(
    ("text", "key"),
    [("ctrl-\\", b"\x1c"), ("ctrl-a", b"\x01"), ("Ctrl-Q", b"\x11"), ("ctrl-]", b"\x1d")],
)
def test_parse_detach_key(text: str, key: bytes) -> None:
    assert parse_detach_key(text) == key


@pytest.mark.parametrize("bad", ["q", "ctrl-", "ctrl-qq", "ctrl-1", "alt-q", ""])
def test_parse_detach_key_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid detach key"):
        parse_detach_key(bad)


def test_parse_mode() -> None:
    assert parse_mode("644") == parse_mode("0644") == parse_mode("0o644") == 0o644
    for bad in ("", "8", "rw", "77777"):
        with pytest.raises(ValueError):
            parse_mode(bad)


def test_parse_session_command() -> None:
    assert parse_session_command(("ls", "-l")) == ["ls", "-l"]
    assert parse_session_command(("ls", "--")) == ["ls", "--"]
    with pytest.raises(ValueError, match="missing the command"):
        parse_session_command(())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("1h", 3600),
        ("2d", 172800),
        ("1h30m", 5400),
        ("1.5h", 5400),
        (" 2D ", 172800),
        ("0.5", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-5", "0", "1x", "1h 2m", "nan", "inf", "1e400"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_ttl_can_mean_no_expiry() -> None:
    assert parse_ttl("none") is parse_ttl("never") is parse_ttl("0") is None
    assert parse_ttl("1m") == 60


def test_parse_labels() -> None:
    assert parse_labels(["team=ml", "note=a=b", "flag="]) == {
        "team": "ml",
        "note": "a=b",
        "flag": "",
    }
    for bad in ("team", "=ml"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_labels([bad])


def test_engine_for_a_runtime_alone_is_docker() -> None:
    assert engine_for(None, None) is None  # the daemon's default
    assert engine_for("qemu", None) == "qemu"
    assert engine_for(None, "runsc") == "docker"
    assert engine_for("qemu", "runsc") == "qemu"  # the daemon says no, not the CLI


@pytest.mark.parametrize(
    ("arg", "where"),
    [
        ("dev:/etc/hosts", ("dev", "/etc/hosts")),
        ("sb-1a2b:rel/path", ("sb-1a2b", "rel/path")),
        ("dev:a:b", ("dev", "a:b")),
        ("-", (None, "-")),
        ("./dev:x", (None, "./dev:x")),
        ("/abs/dev:x", (None, "/abs/dev:x")),
        ("dir/dev:x", (None, "dir/dev:x")),
        ("plain", (None, "plain")),
        (":x", (None, ":x")),
    ],
)
def test_parse_copy_location(arg: str, where: tuple[str | None, str]) -> None:
    assert parse_copy_location(arg) == where


@pytest.mark.parametrize("bad", ["dev:", "dev:-", "bad name!:x"])
def test_parse_copy_location_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_copy_location(bad)
