"""Connections to the other nodes' APIs, kept for reuse: one pool per node.

A relayed request costs one HTTP/1.1 exchange on a connection that is usually
open already (keep-alive): no TCP handshake, no DNS, no TLS per request. Taking
and returning a connection is O(1), a stack of idle ones per node, newest first
(as :mod:`kiln.server.proxy.pools`, and for the same reason: httpcore's own pool
does work quadratic in its connections). A node's address is its registered
``address``, a base URL (``http://host:port`` or ``https://…``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore

from kiln.agent_client import ForwardStream

from ..proxy.backend import ForwardStream as SocketStream

#: Opening a connection to another node; reads have no limit (a streamed exec may be
#: silent for minutes).
CONNECT_TIMEOUT_S = 5.0
#: Idle connections kept per node, and for how long: well under the daemon's own
#: keep-alive (75 s), so a kept connection is rarely one the other node is closing.
MAX_IDLE = 64
IDLE_EXPIRY_S = 30.0


class NodeUnreachable(Exception):
    """No connection to the node could be opened."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a node's API listens, from its registered base URL."""

    scheme: str  # "http" or "https"
    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> Origin:
        """ValueError for anything but ``http(s)://host[:port]``."""
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"node address {address!r} is not an http(s)://host:port URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode()


class Lease:
    """One exchange's use of a pooled connection."""

    __slots__ = ("conn", "done", "pool", "reused")

    def __init__(self, pool: NodePool, conn: httpcore.AsyncHTTP11Connection, reused: bool) -> None:
        self.pool = pool
        self.conn = conn
        self.reused = reused
        self.done = False

    async def release(self) -> None:
        """Give the connection back (its response must be closed). Idempotent."""
        if not self.done:
            self.done = True
            await self.pool._give_back(self.conn)


class NodePool:
    """Connections to one node."""

    def __init__(self, name: str, origin: Origin) -> None:
        self.name = name
        self.origin = origin
        self._idle: list[httpcore.AsyncHTTP11Connection] = []
        self._backend = httpcore.AnyIOBackend()
        self._ssl = ssl.create_default_context() if origin.scheme == "https" else None
        self._closed = False

    async def _connect(self) -> httpcore.AsyncNetworkStream:
        o = self.origin
        try:
            if self._ssl is None:
                return SocketStream(await _connect_socket(o.host, o.port))
            stream = await self._backend.connect_tcp(o.host, o.port, timeout=CONNECT_TIMEOUT_S)
            return await stream.start_tls(
                self._ssl, server_hostname=o.host, timeout=CONNECT_TIMEOUT_S
            )
        except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError, TimeoutError) as exc:
            raise NodeUnreachable(f"{o.host}:{o.port}: {exc or type(exc).__name__}") from exc

    async def _take_idle(self) -> httpcore.AsyncHTTP11Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.is_idle() and not conn.has_expired():
                return conn
            await conn.aclose()
        return None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Lease]:
        """A connection to the node, given back (or closed) when the block ends, or
        earlier by :meth:`Lease.release`. NodeUnreachable if none can be opened."""
        conn = await self._take_idle()
        reused = conn is not None
        if conn is None:
            o = self.origin
            origin = httpcore.Origin(o.scheme.encode(), o.host.encode(), o.port)
            conn = httpcore.AsyncHTTP11Connection(origin, await self._connect(), IDLE_EXPIRY_S)
        lease = Lease(self, conn, reused)
        try:
            yield lease
        except BaseException:
            lease.done = True
            await conn.aclose()
            raise
        await lease.release()

    async def open_stream(self) -> ForwardStream:
        """A fresh byte stream to the node (a WebSocket's own connection)."""
        o = self.origin
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    o.host, o.port, ssl=self._ssl, limit=1 << 20
                )
        except (OSError, TimeoutError) as exc:
            raise NodeUnreachable(f"{o.host}:{o.port}: {exc or type(exc).__name__}") from exc
        return ForwardStream(reader, writer)

    async def _give_back(self, conn: httpcore.AsyncHTTP11Connection) -> None:
        if conn.is_idle() and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


async def _connect_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (Nagle off: requests are small and
    answered at once). Plain sockets rather than asyncio transports: a node that
    answers before reading the whole body (a 413) and closes must still have its
    answer read after the write failed, which a transport no longer does."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
    raise error or OSError(f"no address for {host}")


class NodePools:
    """One pool per node, made on first use and replaced when its address changes."""

    def __init__(self) -> None:
        self._pools: dict[str, NodePool] = {}

    async def get(self, name: str, address: str) -> NodePool:
        """ValueError for an address that is no base URL."""
        origin = Origin.parse(address)
        pool = self._pools.get(name)
        if pool is not None and pool.origin == origin:
            return pool
        if pool is not None:
            await pool.aclose()  # the node came back elsewhere
        pool = self._pools[name] = NodePool(name, origin)
        return pool

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()
