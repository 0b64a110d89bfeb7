"""eth0 configuration by ioctl, on a real (TAP) interface in a private network namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.guest.netconf import default_route, disable_ipv6, hwaddr, ifreq, sockaddr_in

SRC = Path(__file__).resolve().parents[2] / "src"

# Runs inside `unshare --net`: a TAP device stands in for eth0.
_SCRIPT = """
import json, subprocess, sys
from kiln.guest.config import NetworkSpec
from kiln.guest.netconf import configure
subprocess.run(["ip", "tuntap", "add", "eth0", "mode", "tap"], check=True)
spec = NetworkSpec(**json.loads(sys.argv[1]))
configure(spec)
configure(spec)  # again: nothing changes, nothing fails
def ip(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], check=True, capture_output=True).stdout)
with open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6") as f:
    ipv6_off = f.read().strip() == "1"
print(json.dumps({"link": ip("addr", "show", "dev", "eth0"), "routes": ip("route", "show"),
                  "ipv6_off": ipv6_off}))
"""


def test_packing() -> None:
    assert sockaddr_in("10.0.0.5") == b"\x02\x00\x00\x00\x0a\x00\x00\x05" + bytes(8)
    assert len(ifreq("eth0", sockaddr_in("10.0.0.5"))) == 40
    assert hwaddr("52:54:00:12:34:ab")[2:8] == bytes.fromhex("5254001234ab")
    route = default_route("10.0.0.1")
    assert len(route) == 120  # sizeof(struct rtentry) on 64-bit Linux
    assert route[24:40] == sockaddr_in("10.0.0.1")  # rt_gateway, after rt_pad1 and rt_dst
    with pytest.raises(ValueError, match="interface name"):
        ifreq("x" * 16)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip",
)
@pytest.mark.parametrize("gateway", ["10.213.5.1", None])
def test_configure_a_real_interface(gateway: str | None) -> None:
    spec = {"address": "10.213.5.7/24", "gateway": gateway, "mac": "52:54:00:12:34:ab"}
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", _SCRIPT, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout)
    (link,) = state["link"]
    assert link["address"] == "52:54:00:12:34:ab"
    assert "UP" in link["flags"]
    # IPv4 only: no link-local IPv6 address, no router solicitations.
    assert state["ipv6_off"] is True
    assert [a["family"] for a in link["addr_info"]] == ["inet"]
    (addr,) = [a for a in link["addr_info"] if a["family"] == "inet"]
    assert (addr["local"], addr["prefixlen"], addr["broadcast"]) == (
        "10.213.5.7",
        24,
        "10.213.5.255",
    )
    defaults = [r for r in state["routes"] if r["dst"] == "default"]
    if gateway is None:
        assert defaults == []
    else:
        # "linkdown": nothing reads the TAP, so it has no carrier.
        assert [(r["gateway"], r["dev"]) for r in defaults] == [(gateway, "eth0")]


def test_disable_ipv6_without_ipv6_is_a_no_op(tmp_path: Path) -> None:
    disable_ipv6("eth0", proc_sys=str(tmp_path / "missing"))  # a kernel without IPv6


def test_disable_ipv6_writes_the_switch(tmp_path: Path) -> None:
    (tmp_path / "eth0").mkdir()
    disable_ipv6("eth0", proc_sys=str(tmp_path))
    assert (tmp_path / "eth0" / "disable_ipv6").read_text() == "1"


def test_disable_ipv6_that_cannot_write_leaves_the_network_alone(tmp_path: Path) -> None:
    (tmp_path / "eth0" / "disable_ipv6").mkdir(parents=True)  # unwritable: EISDIR
    disable_ipv6("eth0", proc_sys=str(tmp_path))  # no exception: best effort
