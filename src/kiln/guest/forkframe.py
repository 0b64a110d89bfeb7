"""The Ethernet frames that hand a fork's clone its identity (host and guest; stdlib only).

A fork's clone wakes up as its source, with the source's address and MAC, so
the host keeps its TAP off the bridge until it has taken its own. While it is
off, the TAP is a wire between the host and that one guest: the host sends the
identity there as one raw Ethernet frame of :data:`ETHERTYPE` (an IEEE "local
experimental" type that nothing else on the wire uses), and the agent, which
listens for that type on its interface from boot on (see
:mod:`kiln.guest.reidentify`), takes the identity and answers with an
acknowledgement frame the same way.

Why a frame and not the config drive: under TCG every code path runs for the
first time in the clone's new QEMU. The network receive path is one the first
request to the agent needs anyway; the drive's resize uevent, its block read
and a console line polled by the host were all extra (~100 ms measured).

The identity frame carries the source's agent token: a guest takes an identity
only from whoever could already command its agent. Sandbox ports on the bridge
cannot send this type at all (the firewall lets only IPv4 and ARP through).
"""

from __future__ import annotations

import json
from typing import Any, Final

#: IEEE 802 local experimental EtherType 1.
ETHERTYPE: Final = 0x88B5
#: Payload bytes one frame can carry: the interfaces' MTU.
MAX_PAYLOAD: Final = 1500
BROADCAST: Final = b"\xff" * 6

_IDENTITY: Final = b"KILN-IDENTITY\x01"
_ACK: Final = b"KILN-IDENTITY-ACK\x01"


def identity_frame(identity: dict[str, Any], previous_token: str) -> bytes:
    """The payload that tells a clone whose agent token is ``previous_token`` to take
    ``identity`` (config.json fields); ValueError if it does not fit one frame."""
    body = json.dumps({"previous_token": previous_token, "identity": identity}).encode()
    payload = _IDENTITY + body
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"an identity of {len(payload)} bytes does not fit one frame")
    return payload


def parse_identity_frame(payload: bytes) -> tuple[str, dict[str, Any]] | None:
    """(previous token, identity) of an identity frame; None for anything else."""
    if not payload.startswith(_IDENTITY):
        return None
    try:
        data = json.loads(payload[len(_IDENTITY) :].rstrip(b"\0"))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    token, identity = data.get("previous_token"), data.get("identity")
    if not isinstance(token, str) or not isinstance(identity, dict):
        return None
    return token, identity


def ack_frame(sandbox_id: str) -> bytes:
    """The clone's answer: it is ``sandbox_id`` now."""
    return _ACK + json.dumps({"sandbox_id": sandbox_id}).encode()


def parse_ack_frame(payload: bytes) -> str | None:
    """The sandbox id an acknowledgement names; None for anything else. (Ethernet
    pads short frames with zeros: they are stripped.)"""
    if not payload.startswith(_ACK):
        return None
    try:
        data = json.loads(payload[len(_ACK) :].rstrip(b"\0"))
    except ValueError:
        return None
    sandbox_id = data.get("sandbox_id") if isinstance(data, dict) else None
    return sandbox_id if isinstance(sandbox_id, str) else None
