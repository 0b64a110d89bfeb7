"""httpcore's network backend over the agent's forward channel.

httpcore speaks HTTP/1.1 (through h11) and pools connections; all it needs from
a transport is :class:`httpcore.AsyncNetworkBackend` (connect) and
:class:`httpcore.AsyncNetworkStream` (read, write, close). Here "connect to
127.0.0.1:port" opens a forward through the sandbox's guest agent, so the proxy
uses a well-kept HTTP client unchanged and no HTTP is parsed by hand.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore

from kiln.agent_client import AgentClient, AgentError, ForwardError


class ForwardStream(httpcore.AsyncNetworkStream):
    """A forwarded connection as httpcore sees it: a non-blocking socket plus the
    bytes the service sent before the forward handshake had been read to its end."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self._sock = sock
        self._pending = leftover
        self._loop = asyncio.get_running_loop()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self._pending:
            data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            return data
        try:
            async with asyncio.timeout(timeout):
                return await self._loop.sock_recv(self._sock, max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._loop.sock_sendall(self._sock, buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._sock.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("TLS is not spoken inside the sandbox relay")

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks before reusing an idle connection: readable means the
            # service closed it (or sent junk), so it must not be reused.
            return bool(self._pending) or _readable(self._sock)
        if info == "socket":
            return self._sock
        return None

    def detach(self) -> tuple[socket.socket, bytes]:
        """The socket and unread bytes, for a relay that continues without httpcore."""
        pending, self._pending = self._pending, b""
        return self._sock, pending


class SandboxBackend(httpcore.AsyncNetworkBackend):
    """Connects to ports inside one sandbox through its agent.

    ``client`` is swapped for the newest agent client before each request (the
    sandbox may have been woken since the pool was made).
    """

    def __init__(self, client: AgentClient, label: str) -> None:
        self.client = client
        self.label = label

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                sock, leftover = await self.client.forward_socket(port)
        except ForwardError as exc:
            raise httpcore.ConnectError(
                f"nothing is listening on port {port} in {self.label}"
            ) from exc
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(
                f"connecting to port {port} in {self.label} timed out"
            ) from exc
        except AgentError as exc:
            raise httpcore.ConnectError(f"cannot reach port {port} in {self.label}: {exc}") from exc
        return ForwardStream(sock, leftover)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("only TCP ports inside a sandbox can be proxied")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _readable(sock: socket.socket) -> bool:
    """Whether a read would not block (data or EOF), without reading; any fd number
    (``select`` fails above 1023)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True  # closed or broken: certainly not reusable
    return True
