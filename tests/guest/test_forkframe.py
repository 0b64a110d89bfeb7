"""A fork's identity by Ethernet frame: the frame format, and the agent's side on a
real veth pair in a private network (and mount) namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.guest.forkframe import (
    MAX_PAYLOAD,
    ack_frame,
    identity_frame,
    parse_ack_frame,
    parse_identity_frame,
)

SRC = Path(__file__).resolve().parents[2] / "src"

IDENTITY = {
    "sandbox_id": "clone",
    "token": "n" * 32,
    "network": {"address": "10.213.6.9/24", "gateway": "10.213.6.1", "mac": "52:54:00:00:06:09"},
}


def test_an_identity_frame_round_trips() -> None:
    payload = identity_frame(IDENTITY, "o" * 32)
    assert parse_identity_frame(payload) == ("o" * 32, IDENTITY)
    # Ethernet pads a short frame with zeros; the parser does not mind.
    assert parse_identity_frame(payload + b"\0" * 10) == ("o" * 32, IDENTITY)


def test_an_ack_round_trips_even_padded() -> None:
    assert parse_ack_frame(ack_frame("clone")) == "clone"
    assert parse_ack_frame(ack_frame("c") + b"\0" * 30) == "c"


def test_anything_else_is_no_frame_of_ours() -> None:
    assert parse_identity_frame(b"\0" * 64) is None
    assert parse_identity_frame(ack_frame("clone")) is None
    assert parse_ack_frame(identity_frame(IDENTITY, "o")) is None
    good = identity_frame(IDENTITY, "o")
    prefix = good[: good.index(b"{")]
    assert parse_identity_frame(prefix + b"{not json") is None
    assert parse_identity_frame(prefix + b"[1, 2]") is None
    assert parse_identity_frame(prefix + json.dumps({"previous_token": 1}).encode()) is None
    assert parse_ack_frame(ack_frame("x")[:-3]) is None


def test_an_identity_too_big_for_a_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        identity_frame({**IDENTITY, "hostname": "h" * MAX_PAYLOAD}, "o")


# Runs inside `unshare --net --mount`: eth0 is one end of a veth pair, the test
# plays the host on the other end (host0).
_SCRIPT = """
import json, socket, subprocess, sys, time
from kiln.guest import forkframe
from kiln.guest.config import NetworkSpec
from kiln.guest.netconf import configure
from kiln.guest.reidentify import IdentityWatch

def sh(*args):
    subprocess.run(args, check=True)

sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "host0")
sh("ip", "link", "set", "host0", "up")
configure(NetworkSpec("10.213.6.7/24", "10.213.6.1", "52:54:00:00:06:07"))
tokens = ["o" * 32]
taken = []

def on_new(config):
    taken.append(config.sandbox_id)
    tokens[0] = config.token

IdentityWatch("/nonexistent", "src", on_new, interface="eth0",
              current_token=lambda: tokens[0]).start()
proto = socket.htons(forkframe.ETHERTYPE)
host = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, proto)
host.bind(("host0", forkframe.ETHERTYPE))
host.settimeout(5)
identity = json.loads(sys.argv[1])

def ask(previous):
    host.sendto(forkframe.identity_frame(identity, previous),
                ("host0", forkframe.ETHERTYPE, 0, 0, forkframe.BROADCAST))
    try:
        return forkframe.parse_ack_frame(host.recv(2048))
    except TimeoutError:
        return None

def ip(*args):
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True).stdout
    return json.loads(out)

host.settimeout(1)
forged = ask("x" * 32)
forged_addr = ip("addr", "show", "dev", "eth0")
host.settimeout(10)
first = ask("o" * 32)
again = ask("o" * 32)  # a resend after the host missed the answer
print(json.dumps({"forged": forged, "forged_addr": forged_addr, "first": first,
                  "again": again, "taken": taken, "token": tokens[0],
                  "link": ip("addr", "show", "dev", "eth0"), "routes": ip("route", "show")}))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip",
)
def test_the_agent_takes_an_identity_frame_with_its_token_only() -> None:
    proc = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "-c", _SCRIPT, json.dumps(IDENTITY)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout)

    # Without the agent's current token: no answer, nothing changed.
    assert state["forged"] is None
    assert "without the agent's token" in proc.stderr
    (link,) = state["forged_addr"]
    assert link["address"] == "52:54:00:00:06:07"

    # With it: answered, taken once, and a resend is answered again.
    assert state["first"] == "clone" and state["again"] == "clone"
    assert state["taken"] == ["clone"] and state["token"] == "n" * 32
    (link,) = state["link"]
    assert link["address"] == "52:54:00:00:06:09"
    assert [(a["local"], a["prefixlen"], a["broadcast"]) for a in link["addr_info"]] == [
        ("10.213.6.9", 24, "10.213.6.255")
    ]
    defaults = [r for r in state["routes"] if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in defaults] == [("10.213.6.1", "eth0")]
