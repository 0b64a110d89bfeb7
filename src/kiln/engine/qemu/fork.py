"""Fork: a new sandbox whose disk, memory and processes are a copy of a running one's.

A fork is the two halves a saved image is made of, without the image in between:
:mod:`.capture` copies the source (a brief pause if it is hot) straight into the
clone's directory, and :mod:`.clone` restores it there with the clone's own
identity (address, MAC, hostname, token, RNG, clock).

A sandbox with volumes cannot be forked: a volume is in one sandbox at a time.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ..base import SandboxSpec
from ..errors import InvalidState, SandboxNotFound
from .capture import Capturer, DiskReady
from .clone import Cloner, Origin
from .machine import VM
from .snapshot import SnapshotMeta


def check_source(source: VM, what: str) -> None:
    """A sandbox that can be copied (``what``: "forked", "saved")."""
    if source.destroyed:
        raise SandboxNotFound(f"sandbox {source.sandbox_id!r} was destroyed")
    volumes = source.record.spec.volumes
    if volumes:
        raise InvalidState(
            f"sandbox {source.sandbox_id} has volumes attached"
            f" ({', '.join(v.name for v in volumes)}): a volume cannot be in two"
            f" sandboxes, so it cannot be {what}"
        )


async def origin_of(source: VM) -> Origin:
    size = await asyncio.to_thread(os.path.getsize, source.record.drives[1].path)
    return Origin(source.record, size)


class Forker:
    """Forks sandboxes: capture into the clone's directory, then clone."""

    def __init__(self, capturer: Capturer, cloner: Cloner) -> None:
        self._capturer = capturer
        self._cloner = cloner

    @property
    def last_pause_ms(self) -> float | None:
        """Milliseconds the last hot source stood still (None: it was cold)."""
        return self._capturer.last_pause_ms

    async def fork(self, source: VM, spec: SandboxSpec) -> VM:
        """The clone, hot and answering as itself; the caller adds it to ``vms``."""
        check_source(source, "forked")
        origin = await origin_of(source)
        self._cloner.check(origin, spec, "a fork")

        async def fill(vm: VM, disk_ready: DiskReady) -> SnapshotMeta:
            rootfs = Path(vm.record.drives[0].path)
            return await self._capturer.capture(
                source, vm.paths, rootfs, template_ram=True, disk_ready=disk_ready
            )

        return await self._cloner.clone(origin, spec, fill, f"forked from {source.sandbox_id}")
