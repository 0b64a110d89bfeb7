"""Helpers for network tests: run ``ip``, run programs inside namespaces, ping."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
# A subnet no developer machine is likely to use, distinct from the product default.
TEST_SUBNET = "10.213.77.0/24"


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network tests need root (they create network namespaces)"
    if shutil.which("ip") is None:
        return "network tests need the 'ip' program (iproute2)"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` and return the completed process (text)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check, timeout=30
    )


def _kill_leftovers(ns: str) -> None:
    """Kill processes still running inside ``ns`` (only ever ones this test started)."""
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        if int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def delete_netns(ns: str) -> None:
    if (NETNS_DIR / ns).exists():
        _kill_leftovers(ns)
        ip("netns", "del", ns, check=False)


def fresh_netns_name() -> str:
    return f"kt-{secrets.token_hex(4)}"


# -- small programs run inside namespaces ---------------------------------------------

SERVER = textwrap.dedent(
    """
    import socket, sys
    host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    print(s.getsockname()[1], flush=True)
    while True:
        c, peer = s.accept()
        with c:
            c.sendall(f"{tag} {peer[0]}\\n".encode())
            while data := c.recv(65536):
                c.sendall(data)
    """
)

PING = textwrap.dedent(
    """
    import os, select, socket, struct, sys, time
    def checksum(b):
        if len(b) % 2:
            b += b"\\0"
        s = sum(struct.unpack(f"!{len(b) // 2}H", b))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF
    dst = sys.argv[1]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    deadline = time.monotonic() + 5
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"kiln-ping"
        pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr), ident, seq) + b"kiln-ping"
        s.sendto(pkt, (dst, 0))
        end = time.monotonic() + 0.5
        while (left := end - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data, addr = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if addr[0] == dst and typ == 0 and rid == ident:
                sys.exit(0)
    sys.exit(1)
    """
)


def ping(ns: str, dst: str) -> bool:
    """ICMP echo from inside ``ns`` to ``dst`` (raw socket; no ping binary needed)."""
    return in_ns(ns, sys.executable, "-c", PING, dst, check=False).returncode == 0


def link(ns: str, dev: str) -> dict[str, Any] | None:
    """``ip -j -d link show DEV`` inside ``ns``; None if the device does not exist."""
    proc = ip("-n", ns, "-j", "-d", "link", "show", "dev", dev, check=False)
    if proc.returncode != 0:
        return None
    found: list[dict[str, Any]] = json.loads(proc.stdout)
    return found[0]


def ipv4_addresses(ns: str, dev: str) -> list[str]:
    out: list[dict[str, Any]] = json.loads(ip("-n", ns, "-j", "addr", "show", "dev", dev).stdout)
    return [f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"] if a["family"] == "inet"]


def iptables_rules(ns: str) -> list[str]:
    """``iptables-save`` lines (rules only) inside ``ns``."""
    out = in_ns(ns, "iptables-save").stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    tag: str


@dataclass
class Guest:
    """A fake guest: a namespace whose eth0 is a veth attached to the bridge."""

    ns: str
    ip: str
    host_side: str


# -- the outside world of the firewall tests --------------------------------------------

#: Addresses an "outside" namespace plays, routed from the sandboxes' host namespace:
#: the resolver guests are given, the internet, the host's LAN, a cloud metadata service.
DNS = "192.0.2.53"
PUBLIC = "203.0.113.10"
PUBLIC_2 = "203.0.113.20"
LAN = "192.168.50.1"
METADATA = "169.254.169.254"
OUTSIDE_LINK = ("198.51.100.1", "198.51.100.2")  # the host's side, the outside's


def route_outside(host: str, outside: str) -> None:
    """Join ``outside`` to ``host`` with a veth (``kout``) and route every address the
    outside plays to it; the outside answers on all of them (on its ``lo``)."""
    ip("-n", host, "link", "add", "kout", "type", "veth", "peer", "eth0", "netns", outside)
    ip("-n", host, "addr", "add", f"{OUTSIDE_LINK[0]}/24", "dev", "kout")
    ip("-n", host, "link", "set", "kout", "up")
    ip("-n", outside, "addr", "add", f"{OUTSIDE_LINK[1]}/24", "dev", "eth0")
    ip("-n", outside, "link", "set", "eth0", "up")
    for address in (DNS, PUBLIC, PUBLIC_2, LAN, METADATA):
        ip("-n", outside, "addr", "add", f"{address}/32", "dev", "lo")
        ip("-n", host, "route", "add", f"{address}/32", "via", OUTSIDE_LINK[1])
