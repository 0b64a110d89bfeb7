"""The config drive / kernel command line model (pure) and the file helper of PID 1."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kiln.guest.config import (
    FileSpec,
    GuestConfig,
    NetworkSpec,
    VolumeSpec,
    config_from_cmdline,
    parse_cmdline,
)
from kiln.guest.errors import ConfigError
from kiln.guest.pid1 import BootResult, load_config, write_owned

FULL: dict[str, Any] = {
    "sandbox_id": "sbx-1",
    "hostname": "sbx-1",
    "token": "ab" * 16,
    "env": {"API_KEY": "secret"},
    "files": [{"path": "/etc/motd", "content": base64.b64encode(b"hi\n").decode(), "mode": "0600"}],
    "volumes": [{"device": "/dev/vdc", "mount": "/data", "fstype": "ext4", "size": 4096}],
    "init": "echo started",
    "dns": ["10.0.0.1"],
    "user": "sandbox",
    "network": {"address": "10.0.0.5/24", "gateway": "10.0.0.1", "mac": "52:54:00:12:34:56"},
    "session_idle_timeout": 600,
    "clock_ns": 1_795_000_000_000_000_000,
    "seed": base64.b64encode(b"\x01" * 64).decode(),
    "aslr": False,
}


def test_full_config() -> None:
    config = GuestConfig.from_bytes(json.dumps(FULL).encode())
    assert config.sandbox_id == "sbx-1" and config.hostname == "sbx-1"
    assert config.token == "ab" * 16
    assert config.env == {"API_KEY": "secret"}
    assert config.files == (FileSpec("/etc/motd", b"hi\n", 0o600),)
    assert config.volumes == (VolumeSpec("/dev/vdc", "/data", "ext4", 4096),)
    assert config.init == "echo started"
    assert config.dns == ("10.0.0.1",)
    assert config.network == NetworkSpec("10.0.0.5/24", "10.0.0.1", "52:54:00:12:34:56")
    assert config.session_idle_timeout == 600
    assert config.clock_ns == 1_795_000_000_000_000_000 and config.seed == b"\x01" * 64
    assert config.aslr is False


def test_defaults() -> None:
    config = GuestConfig.from_json({})
    assert config.user == "sandbox"
    assert config.token is None and config.network is None and config.init is None
    assert config.files == () and config.env == {}
    assert config.clock_ns is None and config.seed is None and config.aslr is None
    assert config.workdir is None
    assert GuestConfig.from_json({"workdir": "/opt/app"}).workdir == "/opt/app"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"files": [{"path": "/x", "content": "not base64!"}]}, "base64"),
        ({"files": [{"path": "relative", "content": ""}]}, "absolute"),
        ({"files": [{"path": "/x", "content": "", "mode": "999"}]}, "mode"),
        ({"network": {"address": "10.0.0.5"}}, "address"),
        ({"network": {"address": "10.0.0.5/24", "mac": "zz"}}, "mac"),
        ({"network": {"address": "10.0.0.5/24", "gateway": "nope"}}, "gateway"),
        ({"env": {"A": 1}}, "env"),
        ({"dns": ["not-an-ip"]}, "dns"),
        ({"user": "Bad User"}, "user"),
        ({"hostname": "-bad"}, "hostname"),
        ({"volumes": [{"device": "/dev/vdc"}]}, "mount"),
        ({"volumes": [{"device": "/dev/vdc", "mount": "/d", "size": "big"}]}, "size"),
        ({"session_idle_timeout": -1}, "session_idle_timeout"),
        ({"clock_ns": "soon"}, "clock_ns"),
        ({"clock_ns": -5}, "clock_ns"),
        ({"clock_ns": True}, "clock_ns"),
        ({"seed": 7}, "seed"),
        ({"aslr": "no"}, "aslr"),
        ({"seed": "not base64!"}, "seed"),
        ({"workdir": "opt/app"}, "workdir"),
        ({"workdir": 3}, "workdir"),
    ],
)
def test_invalid_configs(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuestConfig.from_json({**FULL, **patch})


def test_not_json() -> None:
    with pytest.raises(ConfigError, match="JSON"):
        GuestConfig.from_bytes(b"{nope")
    with pytest.raises(ConfigError, match="object"):
        GuestConfig.from_bytes(b"[]")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        GuestConfig.load(tmp_path / "missing.json")


def test_kernel_cmdline() -> None:
    line = (
        "console=ttyS0 kiln.ip=10.0.0.7/24 kiln.gw=10.0.0.1 kiln.token=cafe quiet"
        " kiln.dns=1.1.1.1,8.8.8.8 kiln.=x\n"
    )
    params = parse_cmdline(line)
    assert params == {
        "ip": "10.0.0.7/24",
        "gw": "10.0.0.1",
        "token": "cafe",
        "dns": "1.1.1.1,8.8.8.8",
    }
    config = config_from_cmdline(params)
    assert config.network == NetworkSpec("10.0.0.7/24", "10.0.0.1")
    assert config.token == "cafe"
    assert config.dns == ("1.1.1.1", "8.8.8.8")
    assert config_from_cmdline({}) == GuestConfig()


def test_write_owned_creates_parents_and_applies_mode(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file"
    write_owned(str(target), b"content", 0o640, os.getuid(), os.getgid())
    assert target.read_bytes() == b"content"
    assert target.stat().st_mode & 0o7777 == 0o640


def test_load_config_sources(tmp_path: Path) -> None:
    """The config location logic of PID 1, without mounting anything."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hostname": "from-file"}))
    boot = BootResult(GuestConfig())
    # kiln.config= naming a file: read it; the command line's token fills a gap.
    config = load_config({"config": str(path), "token": "cmdline-token"}, boot)
    assert (config.hostname, config.token) == ("from-file", "cmdline-token")
    # No drive (or kiln.config=none): the kernel command line alone.
    config = load_config({"config": str(tmp_path / "absent"), "ip": "10.0.0.9/24"}, boot)
    assert config.network == NetworkSpec("10.0.0.9/24")
    assert load_config({"config": "none", "token": "t"}, boot).token == "t"
    # A broken drive: logged, and the command line is used instead.
    path.write_text("{broken")
    assert load_config({"config": str(path), "token": "t"}, boot) == GuestConfig(token="t")
    assert (boot.mounts, boot.prepared) == ([], None)
