"""Connections to sandbox ports, kept for reuse: one pool per sandbox, idle ones per port.

HTTP/1.1 itself is httpcore's (:class:`httpcore.AsyncHTTP11Connection` over a
forward, :mod:`.backend`); the pooling is this module's, because httpcore 1.0's
own pool does work quadratic in its connections for every request (a burst of
100 requests spent most of its time there) and closes freed connections while
more than its keep-alive limit are open. Here taking and returning a
connection is O(1): a stack of idle connections per port, newest first.

A pool lives until its sandbox's connections stop being valid (deleted,
stopped, woken from cold: ``SandboxService.on_reset``); then it is closed and
the next request makes a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpcore

from kiln.agent_client import AgentClient

from .backend import SandboxBackend

#: Requests in flight to one sandbox at once (each holds one forward through its
#: agent); more wait for one to finish, this long at most (then 503).
MAX_ACTIVE = 512
WAIT_S = 30.0
#: Idle connections kept per port, and for how long: less than the keep-alive
#: timeouts servers commonly use (uvicorn and Node 5 s), so a kept connection is
#: rarely one the service is closing just then.
MAX_IDLE_PER_PORT = 32
IDLE_EXPIRY_S = 4.0


class PoolBusy(Exception):
    """No connection into the sandbox came free in time."""


class Lease:
    """One exchange's use of a pooled connection."""

    __slots__ = ("conn", "done", "pool", "port", "reused")

    def __init__(
        self, pool: SandboxPool, port: int, conn: httpcore.AsyncHTTP11Connection, reused: bool
    ) -> None:
        self.pool = pool
        self.port = port
        self.conn = conn
        self.reused = reused
        self.done = False

    async def release(self) -> None:
        """Give the connection back now (its response must be closed): reusable if the
        exchange completed, else closed. Idempotent."""
        if not self.done:
            self.done = True
            await self.pool._give_back(self.port, self.conn)


class SandboxPool:
    """Connections into one sandbox."""

    def __init__(self, backend: SandboxBackend) -> None:
        self.backend = backend
        self._idle: dict[int, list[httpcore.AsyncHTTP11Connection]] = {}
        self._slots = asyncio.Semaphore(MAX_ACTIVE)
        self._closed = False

    async def _take_idle(self, port: int) -> httpcore.AsyncHTTP11Connection | None:
        await self._sweep(port)
        idle = self._idle.get(port)
        return idle.pop() if idle else None

    async def _sweep(self, port: int) -> None:
        """Close the port's idle connections that expired or that the service closed
        (readable while idle), oldest first; keep the rest in order."""
        idle = self._idle.get(port)
        if not idle:
            return
        keep = []
        for conn in idle:
            if conn.is_idle() and not conn.has_expired():
                keep.append(conn)
            else:
                await conn.aclose()
        self._idle[port] = keep

    @contextlib.asynccontextmanager
    async def connection(self, port: int, connect_timeout: float) -> AsyncIterator[Lease]:
        """A connection to ``port``, given back (or closed) when the block ends, or
        earlier by :meth:`Lease.release` once its response is closed."""
        try:
            async with asyncio.timeout(WAIT_S):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolBusy(
                f"{MAX_ACTIVE} requests to {self.backend.label} are open; try again later"
            ) from None
        try:
            conn = await self._take_idle(port)
            reused = conn is not None
            if conn is None:
                stream = await self.backend.connect_tcp("127.0.0.1", port, timeout=connect_timeout)
                origin = httpcore.Origin(b"http", b"127.0.0.1", port)
                conn = httpcore.AsyncHTTP11Connection(origin, stream, IDLE_EXPIRY_S)
            lease = Lease(self, port, conn, reused)
            try:
                yield lease
            except BaseException:
                lease.done = True
                await conn.aclose()
                raise
            await lease.release()
        finally:
            self._slots.release()

    async def _give_back(self, port: int, conn: httpcore.AsyncHTTP11Connection) -> None:
        await self._sweep(port)
        idle = self._idle.setdefault(port, [])
        if conn.is_idle() and not self._closed and len(idle) < MAX_IDLE_PER_PORT:
            idle.append(conn)
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when their exchange ends."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()

    def idle_count(self, port: int) -> int:
        return len(self._idle.get(port, ()))


class Pools:
    def __init__(self) -> None:
        self._pools: dict[str, SandboxPool] = {}

    def get(self, sandbox_id: str, client: AgentClient, label: str) -> SandboxPool:
        """The sandbox's pool, connecting through ``client`` from now on."""
        pool = self._pools.get(sandbox_id)
        if pool is None:
            pool = self._pools[sandbox_id] = SandboxPool(SandboxBackend(client, label))
        pool.backend.client = client
        pool.backend.label = label
        return pool

    async def drop(self, sandbox_id: str) -> None:
        """Forget the sandbox's pool and close its idle connections."""
        pool = self._pools.pop(sandbox_id, None)
        if pool is not None:
            await pool.aclose()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()

    def __len__(self) -> int:
        return len(self._pools)
