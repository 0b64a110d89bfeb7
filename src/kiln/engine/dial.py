"""Dialing a guest agent from the daemon's namespace into the sandbox network's."""

from __future__ import annotations

import socket

from kiln.agent_client import Dialer, tcp_dialer
from kiln.network import connect_in


def agent_dialer(netns: str | None, host: str, port: int, timeout: float) -> Dialer:
    """A :data:`~kiln.agent_client.Dialer` for ``host:port`` as seen from ``netns``."""
    if netns is None:
        return tcp_dialer(host, port)

    async def dial() -> socket.socket:
        return await connect_in(netns, host, port, timeout)

    return dial
