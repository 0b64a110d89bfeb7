"""Dialing a guest agent from the daemon's namespace into the sandbox network's.

The agent client wants a connected socket per connection
(:data:`kiln.agent_client.Dialer`); :mod:`kiln.network` offers
:func:`~kiln.network.open_connection_in`, which makes the socket inside the
configured network namespace and hands back asyncio streams. This adapter
keeps the socket and lets the stream go: it duplicates the connected socket's
descriptor and aborts the transport, which closes only its own descriptor (no
``shutdown``), so the connection stays up on the duplicate. The agent never
speaks first, so the transport cannot have buffered anything.
"""

from __future__ import annotations

import os
import socket

from kiln.agent_client import Dialer, tcp_dialer
from kiln.network import open_connection_in


def agent_dialer(netns: str | None, host: str, port: int, timeout: float) -> Dialer:
    """A :data:`~kiln.agent_client.Dialer` for ``host:port`` as seen from ``netns``."""
    if netns is None:
        return tcp_dialer(host, port)

    async def dial() -> socket.socket:
        _, writer = await open_connection_in(netns, host, port, timeout)
        transport = writer.transport
        try:
            raw = writer.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        finally:
            transport.abort()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return dial
