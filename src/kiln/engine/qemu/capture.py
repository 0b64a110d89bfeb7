"""The capture half of a fork or a save: a sandbox's root disk, memory and device state
copied into another directory, the source noticing nothing beyond a brief pause.

* **hot source** (a warm one, or a cold one without a usable snapshot, is made hot
  first): QMP ``stop``; migrate with ``x-ignore-shared`` into the destination's
  ``state.bin`` (device state only, as in :mod:`.snapshot`: the RAM lives in the
  ``share=on`` file, which a completed migration leaves consistent with the
  disks, inactivated and flushed); sparse/reflink copies of the RAM file and root
  disk; ``cont`` (QEMU re-activates the disks) and the source's clock is set
  again. :attr:`Capturer.last_pause_ms` is how long its vCPUs stood still.
* **cold source with a valid snapshot**: the same three files are copied; the
  source is not touched.

What is captured is an ordinary cold snapshot (``snapshot.json`` says how to
restore it); :mod:`.clone` makes a sandbox of its own from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..base import Thermal
from ..errors import EngineError, InvalidState, SandboxNotFound
from ..states import Op
from . import disks, machine, snapshot
from .layout import Paths
from .machine import VM
from .thermal import MAX_BANDWIDTH, ThermalControl

log = logging.getLogger(__name__)

_SNAPSHOT_FD: Final = "kiln-capture"

#: Told by a capture, once the copy's root disk is in place, which RAM file the copy's
#: QEMU is to map: a template's (its path), or None: the copy's own, made at its full
#: size and filled in place from then on. The copy's QEMU may start meanwhile.
DiskReady = Callable[[str | None], None]
#: How often a capture makes a source hot and looks again (it may cool meanwhile).
_ATTEMPTS: Final = 3


class Capturer:
    """Copies running or cold sandboxes into directories."""

    def __init__(self, thermal: ThermalControl) -> None:
        self._thermal = thermal
        #: Milliseconds the last hot source stood still (None: it was cold).
        self.last_pause_ms: float | None = None

    async def capture(
        self,
        source: VM,
        dest: Paths,
        rootfs: Path,
        *,
        template_ram: bool,
        disk_ready: DiskReady | None = None,
    ) -> snapshot.SnapshotMeta:
        """The source's memory and device state into ``dest`` and its root disk to
        ``rootfs``; the snapshot meta that restores them (not written: the caller's).

        ``template_ram``: a source still mapping its template's RAM copy-on-write may
        hand the capture that mapping (a fork, gone with the template); False: the
        capture holds all of its memory itself (a saved image outlives templates).
        ``disk_ready``: called as soon as the copy's QEMU could start (see
        :data:`DiskReady`); the RAM file is then copied in place."""
        for _ in range(_ATTEMPTS):
            meta = await self._try(source, dest, rootfs, template_ram, disk_ready)
            if meta is not None:
                return meta
            await self._thermal.transition(source, Op.ENSURE_HOT)
        raise InvalidState(f"sandbox {source.sandbox_id} kept changing state")

    async def _try(
        self,
        source: VM,
        dest: Paths,
        rootfs: Path,
        template_ram: bool,
        disk_ready: DiskReady | None,
    ) -> snapshot.SnapshotMeta | None:
        """None if the source is in no state to copy from (the caller makes it hot)."""
        async with source.lock:
            if source.destroyed:
                raise SandboxNotFound(f"sandbox {source.sandbox_id!r} was destroyed")
            machine.notice_death(source)
            state = source.state
            template = None
            if state.live and state.thermal is Thermal.HOT and not source.reboot:
                # The restore writes the streamed RAM over a template mapping
                # (anonymous pages: fast), and the clone's first stop settles it.
                if template_ram:
                    template = source.meta.ram_template
                ram_in_state = await self._copy_running(source, dest, rootfs, template, disk_ready)
            elif (
                not state.live
                and source.meta.valid
                and not source.reboot
                and (template_ram or source.meta.ram_template is None)
            ):
                self.last_pause_ms = None
                ram_in_state = source.meta.ram_in_state
                template = source.meta.ram_template
                await self._copy_files(
                    source,
                    dest,
                    rootfs,
                    source.paths.state,
                    copy_ram=True,
                    template=template,
                    disk_ready=disk_ready,
                )
            else:
                return None
        return snapshot.SnapshotMeta(
            valid=True,
            ram_inode=snapshot.ram_inode(dest.ram),
            ram_in_state=ram_in_state,
            ram_template=template,
        )

    async def _copy_running(
        self,
        source: VM,
        dest: Paths,
        rootfs: Path,
        template: str | None,
        disk_ready: DiskReady | None,
    ) -> bool:
        """Pause, save, copy, continue; whether the RAM went into the device state (its
        file was replaced while QEMU ran, as in the snapshot's fallback)."""
        started = time.perf_counter()
        await machine.cancel_clock(source)
        await machine.qmp(source, "stop")
        base_ok = (
            source.meta.ram_template is None
            and source.meta.ram_inode is not None
            and snapshot.ram_inode(source.paths.ram) == source.meta.ram_inode
        )
        try:
            await machine.qmp(
                source,
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": base_ok}]},
            )
            await machine.qmp(source, "migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            fd = os.open(
                dest.state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            try:
                assert source.qmp is not None
                await source.qmp.send_fd(fd, _SNAPSHOT_FD)
            finally:
                os.close(fd)
            await machine.qmp(source, "migrate", {"uri": f"fd:{_SNAPSHOT_FD}"})
            await self._thermal.migration_done(source, "saving the device state for a copy")
            await self._copy_files(
                source,
                dest,
                rootfs,
                dest.state_tmp,
                copy_ram=base_ok,
                template=template,
                disk_ready=disk_ready,
            )
        finally:
            if source.qmp is not None and source.state.live:
                with contextlib.suppress(EngineError):
                    await machine.qmp(source, "cont")
            self.last_pause_ms = (time.perf_counter() - started) * 1000
            if source.state.live:
                # Its clock stood still: set it (and reseed) as after any resume.
                source.clock_task = asyncio.create_task(
                    self._thermal.set_clock(source), name=f"kiln-clock-{source.sandbox_id}"
                )
        log.info(
            "copy of %s: the source was paused for %.1f ms", source.sandbox_id, self.last_pause_ms
        )
        return not base_ok

    async def _copy_files(
        self,
        source: VM,
        dest: Paths,
        rootfs: Path,
        state: Path,
        *,
        copy_ram: bool,
        template: str | None,
        disk_ready: DiskReady | None,
    ) -> None:
        disk = source.record.drives[0]
        ram_size = source.record.spec.memory_mb << 20
        own_ram = copy_ram or template is None  # else the copy maps the template's
        if disk_ready is None:
            copies = [disks.copy_sparse(Path(disk.path), rootfs)]
            if copy_ram:
                copies.append(disks.copy_sparse(source.paths.ram, dest.ram))
            elif own_ram:
                # The RAM is in the device state; the restore loads it into a fresh file.
                await asyncio.to_thread(snapshot.create_ram_file, dest.ram, ram_size)
            await asyncio.gather(*copies)
        else:
            # What the copy's QEMU reads when it starts must be whole by then: a
            # qcow2 root disk's header and tables (a small file: the overlay). A raw
            # disk is only opened, and the RAM file only mapped: both are made at
            # their size and filled in place while that QEMU starts.
            if own_ram:
                await asyncio.to_thread(snapshot.create_ram_file, dest.ram, ram_size)
            if disk.format == "raw":
                size = await asyncio.to_thread(os.path.getsize, disk.path)
                await asyncio.to_thread(disks.make_sparse, rootfs, size)
                disk_ready(template)
                copies = [disks.copy_into(Path(disk.path), rootfs)]
            else:
                await disks.copy_sparse(Path(disk.path), rootfs)
                disk_ready(template)
                copies = []
            if copy_ram:
                copies.append(disks.copy_into(source.paths.ram, dest.ram))
            await asyncio.gather(*copies)
        if state != dest.state_tmp:
            await disks.copy_sparse(state, dest.state_tmp)
        await asyncio.to_thread(os.replace, dest.state_tmp, dest.state)
