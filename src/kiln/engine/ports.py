"""Listening TCP ports of a sandbox, from the text of ``/proc/net/tcp`` and ``tcp6``.

Engine-agnostic: every engine's sandbox runs the guest agent, so the text comes
from an exec through the agent and the parsing is pure. The agent's own ports
(1024 control, 1025 forward) are not the user's and are left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from kiln.agent_client import AgentClient, AgentError

from .errors import EngineError

TCP_LISTEN: Final = "0A"
AGENT_PORTS: Final = frozenset({1024, 1025})


def parse_listening_ports(text: str, exclude: Iterable[int] = AGENT_PORTS) -> list[int]:
    """Sorted unique local ports of LISTEN sockets in ``/proc/net/tcp{,6}`` text.

    Several files may be concatenated (their header lines are skipped); lines that
    do not parse are ignored rather than failing the whole listing.
    """
    skip = frozenset(exclude)
    ports: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        # "sl local_address rem_address st ..." -- the header starts with "sl".
        if len(fields) < 4 or not fields[0].endswith(":"):
            continue
        if fields[3].upper() != TCP_LISTEN:
            continue
        _, sep, port_hex = fields[1].rpartition(":")
        if not sep:
            continue
        try:
            port = int(port_hex, 16)
        except ValueError:
            continue
        if 0 < port <= 0xFFFF and port not in skip:
            ports.add(port)
    return sorted(ports)


PROC_NET_TCP: Final = ("cat", "/proc/net/tcp", "/proc/net/tcp6")


async def listening_ports(client: AgentClient, timeout: float = 10.0) -> list[int]:  # noqa: ASYNC109
    """The user's listening TCP ports inside the sandbox behind ``client``."""
    try:
        result = await client.exec(list(PROC_NET_TCP), timeout=timeout)
    except AgentError as exc:
        raise EngineError(f"cannot list listening ports: {exc}") from exc
    # tcp6 is missing when the guest kernel has no IPv6: cat still prints tcp.
    return parse_listening_ports(result.stdout.decode(errors="replace"))
