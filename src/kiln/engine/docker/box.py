"""What the Docker engine holds of one container it made: :class:`Box`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from kiln.agent_client import AgentClient
from kiln.engine.base import Capabilities
from kiln.engine.boots import LastBoot
from kiln.engine.states import State

from .host import is_zombie
from .record import Record

#: What each runtime can do (see :mod:`.engine`'s docstring).
CAPABILITIES = {
    "runc": Capabilities(pause=True, snapshots=False),
    "runsc": Capabilities(pause=True, snapshots=False),
}


@dataclass(eq=False)
class Box:
    """A sandbox's container (or a warm-pool member's: :mod:`.pool`)."""

    record: Record
    dir: Path
    state: State
    client: AgentClient
    pid: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    destroyed: bool = False
    last_boot: LastBoot | None = None
    problem: str | None = None  # why it is in error: its container is gone

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES[self.record.runtime]


def pid_alive(pid: int | None) -> bool:
    return pid is not None and not is_zombie(pid)
