"""Sandbox isolation end to end: a real ``kiln serve`` with QEMU and Docker sandboxes of
two users, probing from inside the guests.

The daemon's sandbox networks live in a namespace this module creates; an
"outside" namespace routed from it plays the internet (203.0.113.0/24), the
host's LAN (192.168.50.1), a cloud metadata service (169.254.169.254) and the
resolver guests are given (192.0.2.53); a greeter on every address of the
daemon's namespace plays the host's own services. Every probe is a TCP connect
made by the sandbox user inside a guest, and "reached" means the greeter that
was meant answered with its name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from network._nsutil import DNS, LAN, METADATA, OUTSIDE_LINK, PUBLIC, PUBLIC_2, route_outside

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host, namespace
from .serve import SRC, client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(900)]

LINK = OUTSIDE_LINK  # the daemon namespace's side, the outside's
VM_NET, CT_NET = "10.213.45", "10.213.46"

GREETER = textwrap.dedent(
    """
    import socket, sys, threading
    host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(tag.encode() + b"\\n")
        c.close()
    """
)
PROBE = textwrap.dedent(
    """
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        s.settimeout(10)
        print(s.recv(200).decode().strip() or "empty")
    except OSError as exc:
        print("failed", type(exc).__name__)
    """
)

ICMP_ECHO = textwrap.dedent(
    """
    import socket, struct, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    s.settimeout(5)
    s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"kiln", (sys.argv[1], 0))
    print("reply" if s.recvfrom(200)[0][0] == 0 else "other")
    """
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    procs: list[subprocess.Popen[bytes]] = []

    def greet(ns: str, address: str, port: int, tag: str) -> None:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", GREETER, address, str(port), tag]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"

    with (
        daemon_host(
            tmp_path_factory.mktemp("isolation"),
            "kiln-iso",
            vm=Bridge("kisoq0", f"{VM_NET}.0/24"),
            docker=Bridge("kisod0", f"{CT_NET}.0/24"),
            nat=True,
            dns=[DNS],
        ) as host,
        namespace("kiln-iso") as outside,
    ):
        inside = host.netns
        try:
            route_outside(inside, outside)
            greet(outside, DNS, 53, "dns")
            for address, tag in ((PUBLIC, "public"), (PUBLIC_2, "public2"), (LAN, "lan")):
                greet(outside, address, 443, tag)
            greet(outside, METADATA, 80, "metadata")
            greet(inside, "0.0.0.0", 8080, "host")  # every address of the daemon's namespace
            yield host
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


def _new_user(config: Path, home: Path, name: str) -> str:
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(SRC))
    out = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "user", "create", name, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    keys = re.findall(r"^(\S{20,})$", out, re.MULTILINE)
    assert keys, out
    return str(keys[0])


def _exec(c: httpx.Client, name: str, *cmd: str) -> str:
    # Bounded: a probe or greeter that hangs fails here, not at the module's timeout.
    return exec_ok(c, name, *cmd, timeout_s=120)


def _serve_in(c: httpx.Client, name: str, port: int) -> None:
    r = c.put(f"/sandboxes/{name}/files", params={"path": "/tmp/greet.py"}, content=GREETER)
    assert r.status_code in (200, 201, 204), r.text
    _exec(
        c, name, "sh", "-c", f"nohup python3 /tmp/greet.py 0.0.0.0 {port} {name} >/tmp/g.log 2>&1 &"
    )
    wait = "for i in $(seq 100); do grep -q ready /tmp/g.log && exit 0; sleep 0.1; done; exit 1"
    _exec(c, name, "sh", "-c", wait)


class Prober:
    def __init__(self) -> None:
        self.results: list[tuple[str, str, int, str, str]] = []

    def probe(self, c: httpx.Client, name: str, address: str, port: int) -> str:
        r = c.put(f"/sandboxes/{name}/files", params={"path": "/tmp/probe.py"}, content=PROBE)
        assert r.status_code in (200, 201, 204), r.text
        return _exec(c, name, "python3", "/tmp/probe.py", address, str(port)).strip()

    def check(self, c: httpx.Client, name: str, address: str, port: int, want: str | None) -> None:
        """``want``: the greeter's tag that must answer, or None: nothing may."""
        got = self.probe(c, name, address, port)
        ok = got == want if want is not None else got.startswith("failed")
        self.results.append((name, address, port, str(want), got))
        assert ok, f"{name} -> {address}:{port}: got {got!r}, want {want or 'no answer'}"


def test_sandboxes_reach_only_what_they_should(world: Host) -> None:
    serve = world.serve()
    bob_key = _new_user(world.config, world.home, "bob")
    p = Prober()
    try:
        with client(serve, world.data) as alice, client(serve, world.data, bob_key) as bob:
            specs = (
                (alice, {"name": "avm"}),
                (alice, {"name": "act", "engine": "docker"}),
                (
                    alice,
                    {
                        "name": "adeny",
                        "engine": "docker",
                        "network": {"egress": "deny", "allow": [PUBLIC]},
                    },
                ),
                (bob, {"name": "bct", "engine": "docker"}),
            )
            ips = {}
            for c, body in specs:
                r = c.post("/sandboxes", json=body)
                assert r.status_code == 201, r.text
                ips[body["name"]] = r.json()["ip"]
            for c, name in ((alice, "avm"), (alice, "act"), (bob, "bct")):
                _serve_in(c, name, 8000)

            # Peers: one user's sandboxes, across engines and on one bridge; never
            # another user's; never an agent port.
            p.check(alice, "avm", ips["act"], 8000, "act")
            p.check(alice, "act", ips["avm"], 8000, "avm")
            p.check(alice, "avm", ips["bct"], 8000, None)
            p.check(alice, "act", ips["bct"], 8000, None)
            p.check(bob, "bct", ips["act"], 8000, None)
            p.check(alice, "avm", ips["act"], 1024, None)
            p.check(alice, "act", ips["avm"], 1024, None)
            p.check(alice, "act", ips["adeny"], 1025, None)
            # The host itself, on every address; link-local; the LAN.
            p.check(alice, "avm", f"{VM_NET}.1", 8080, None)
            p.check(alice, "act", f"{CT_NET}.1", 8080, None)
            p.check(alice, "avm", f"{CT_NET}.1", 8080, None)
            p.check(alice, "act", LINK[0], 8080, None)
            p.check(alice, "avm", METADATA, 80, None)
            p.check(alice, "act", METADATA, 80, None)
            p.check(alice, "avm", LAN, 443, None)
            # What is open: the internet and the resolver.
            p.check(alice, "avm", PUBLIC, 443, "public")
            p.check(alice, "act", PUBLIC_2, 443, "public2")
            p.check(bob, "bct", DNS, 53, "dns")
            # An egress policy.
            p.check(alice, "adeny", PUBLIC, 443, "public")
            p.check(alice, "adeny", PUBLIC_2, 443, None)
            p.check(alice, "adeny", DNS, 53, "dns")
            # Root in a container cannot forge packets past the rules (no NET_RAW).
            raw = "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"
            r = alice.post(
                "/sandboxes/adeny/exec", json={"cmd": ["python3", "-c", raw], "user": "root"}
            )
            assert r.json()["exit_code"] != 0 and "PermissionError" in r.json()["stderr"]
            # ... while ping through an ICMP socket (what ping uses without NET_RAW) works.
            assert _exec(alice, "act", "python3", "-c", ICMP_ECHO, PUBLIC) == "reply\n"

        # After a restart the rules are back before anything runs.
        assert serve.stop() == 0
        serve = world.serve()
        with client(serve, world.data) as alice:
            p.check(alice, "avm", PUBLIC, 443, "public")
            p.check(alice, "avm", ips["act"], 8000, "act")
            p.check(alice, "avm", ips["bct"], 8000, None)
            p.check(alice, "adeny", PUBLIC_2, 443, None)
            for name in ("act", "adeny"):
                assert alice.delete(f"/sandboxes/{name}").status_code == 204
            rules = subprocess.run(
                ["ip", "netns", "exec", world.netns, "nft", "list", "ruleset"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert ips["avm"] in rules and ips["bct"] in rules
            assert ips["act"] not in rules and ips["adeny"] not in rules, "rules went with them"
            assert alice.delete("/sandboxes/avm").status_code == 204
    finally:
        serve.stop(signal.SIGKILL)
        print("\n".join(f"{n} -> {a}:{port} want {w} got {g}" for n, a, port, w, g in p.results))
