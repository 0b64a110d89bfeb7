"""One httpcore connection pool per sandbox, so requests to a port reuse connections.

A pool lives until its sandbox's connections stop being valid (deleted,
stopped, woken from cold: see ``SandboxService.on_reset``); then it is closed,
and the next request makes a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpcore

from kiln.agent_client import AgentClient

from .backend import SandboxBackend

#: Connections to one sandbox, over all its ports. Each is one forward through
#: the agent; more requests than this wait for a free one. (httpcore 1.0's pool
#: does work quadratic in its connections per request: keep this modest.)
MAX_CONNECTIONS = 64
#: Idle connections kept for reuse, and for how long. Equal to the maximum: httpcore
#: 1.0 compares its *total* connections with this, so a lower value closes every
#: connection that is freed while more than that many are open.
MAX_IDLE = MAX_CONNECTIONS
IDLE_EXPIRY_S = 30.0


@dataclass
class _Entry:
    backend: SandboxBackend
    pool: httpcore.AsyncConnectionPool


class Pools:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def get(self, sandbox_id: str, client: AgentClient, label: str) -> httpcore.AsyncConnectionPool:
        """The sandbox's pool, connecting through ``client`` from now on."""
        entry = self._entries.get(sandbox_id)
        if entry is None:
            backend = SandboxBackend(client, label)
            pool = httpcore.AsyncConnectionPool(
                max_connections=MAX_CONNECTIONS,
                max_keepalive_connections=MAX_IDLE,
                keepalive_expiry=IDLE_EXPIRY_S,
                network_backend=backend,
            )
            entry = self._entries[sandbox_id] = _Entry(backend, pool)
        entry.backend.client = client
        entry.backend.label = label
        return entry.pool

    async def drop(self, sandbox_id: str) -> None:
        """Close the sandbox's pool (requests still using it fail)."""
        entry = self._entries.pop(sandbox_id, None)
        if entry is not None:
            await entry.pool.aclose()

    async def aclose(self) -> None:
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            await entry.pool.aclose()

    def __len__(self) -> int:
        return len(self._entries)
