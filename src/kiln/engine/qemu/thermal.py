"""Thermal transitions of a sandbox: hot ↔ warm is QMP ``stop``/``cont``; cold is
a snapshot on disk and no process (the file side, and why it is fast, in
:mod:`.snapshot`). A cold sandbox without a usable snapshot (its QEMU died, or
recovery found it gone: :attr:`.machine.VM.reboot`) boots from its own disks
instead: a reboot, files kept and processes lost.

:meth:`ThermalControl.transition` plans each operation with
:func:`kiln.engine.states.plan`, carries out its action and applies its
``next`` state, holding the sandbox's lock only for that -- never across an
agent call. After every resume or restore the guest clock is set through the
agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any, Final

from kiln.agent_client import AgentError
from kiln.faults import crash_point

from ..base import Thermal
from ..boots import LastBoot, boot_reason
from ..errors import EngineError, InvalidState, SandboxCrashed, SandboxNotFound
from ..states import Action, Op, from_disk, plan
from . import late_drive, machine, process, snapshot
from .clock import set_clock
from .config import QemuConfig
from .host import Host
from .hostnet import HostNet
from .machine import VM, Phases, why_unbootable
from .snapshot import SyncStats

log = logging.getLogger(__name__)

_SNAPSHOT_FD: Final = "kiln-snapshot"
_MIGRATE_POLL: Final = 0.002
#: QEMU's default migration bandwidth cap (128 MiB/s) applies even to a stopped VM;
#: it only matters for the full fallback, where RAM goes into the stream.
MAX_BANDWIDTH: Final = 1 << 40


class ThermalControl:
    """``write_drive`` writes a sandbox's config drive to a new file: a boot from its
    disks first writes one a pool claim left due (see :mod:`.late_drive`)."""

    def __init__(
        self, config: QemuConfig, host: Host, net: HostNet, write_drive: late_drive.DriveWriter
    ) -> None:
        self.config = config
        self._host = host
        self._net = net
        self._write_drive = write_drive
        self._prefetch = snapshot.Prefetcher()

    async def close(self) -> None:
        """Stop the RAM pre-reads still running and wait for their threads."""
        await asyncio.to_thread(self._prefetch.close)

    async def transition(self, vm: VM, op: Op) -> VM:
        async with vm.lock:
            if vm.destroyed:
                raise SandboxNotFound(f"sandbox {vm.sandbox_id!r} was destroyed")
            died = machine.notice_death(vm)
            if not vm.state.live:
                # No QEMU to talk to: a death noticed here or by an observer left its
                # QMP connection open.
                await machine.drop_qmp(vm)
            before = vm.state
            try:
                step = plan(op, before, vm.sandbox_id)
            except InvalidState as exc:
                if not died:
                    raise
                # (A pause or resume of a machine that just died.)
                raise SandboxCrashed(
                    f"sandbox {vm.sandbox_id} crashed: its QEMU is gone; it boots again"
                    " from its disks on its next use (files kept, processes lost)"
                ) from exc
            if vm.reboot:
                step = from_disk(step)
            action = step.action
            if action in (Action.PAUSE, Action.SNAPSHOT):
                await machine.cancel_clock(vm)  # the next wake-up sets it again
            with machine.os_errors(f"{op} of sandbox {vm.sandbox_id}"):
                match action:
                    case Action.NOTHING:
                        pass
                    case Action.PAUSE:
                        await machine.qmp(vm, "stop")
                    case Action.RESUME:
                        # A QEMU re-adopted between loading a snapshot and running it.
                        await self.spend_snapshot(vm)
                        await machine.qmp(vm, "cont")
                    case Action.SNAPSHOT:
                        await self.snapshot(vm)
                    case Action.RESTORE:
                        await self.restore(vm)
                    case Action.BOOT:
                        await self.reboot(vm)
                    case _:  # SHUTDOWN, KILL: not planned for these ops with snapshots
                        raise AssertionError(f"{op} planned {action}")
            machine.apply(vm, step)
            reason = boot_reason(action, before)
            if reason is not None:
                vm.last_boot = LastBoot.now(reason)
            if action in (Action.RESUME, Action.RESTORE):
                # The guest's clock stood still: set it (and reseed its RNG) through the
                # agent -- outside the lock, as a task that ensure_hot/agent wait for.
                vm.clock_task = asyncio.create_task(
                    self.set_clock(vm), name=f"kiln-clock-{vm.sandbox_id}"
                )
        task = vm.clock_task
        if op in (Op.ENSURE_HOT, Op.START) and task is not None and not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we were cancelled, not just the clock task
                # A pause, stop or destroy cancelled the clock task: nothing to wait for.
        return vm

    async def set_clock(self, vm: VM) -> None:
        try:
            await set_clock(vm.client, timeout=self.config.agent_timeout)
        except AgentError as exc:
            log.warning("could not set the clock of %s: %s", vm.sandbox_id, exc)

    # ------------------------------------------------------------------ snapshot

    async def snapshot(self, vm: VM) -> None:
        """hot/warm → cold: device state to state.bin, QEMU exits, RAM file synced."""
        p = vm.paths
        started = time.perf_counter()
        was_hot = vm.state.thermal is Thermal.HOT
        from_template = vm.meta.ram_template is not None
        if was_hot:
            await machine.qmp(vm, "stop")
        crash_point("qemu.snapshot.paused")
        # The RAM file is the base of the snapshot; if it vanished or was replaced
        # while QEMU ran, fall back to a full snapshot with RAM in the stream.
        # A clone mapping its template's RAM copy-on-write has no RAM file of its own.
        base_ok = (
            vm.meta.ram_template is None
            and vm.meta.ram_inode is not None
            and snapshot.ram_inode(p.ram) == vm.meta.ram_inode
        )
        try:
            migrate_start = time.perf_counter()
            await self._start_save(vm, ram=not base_ok)
            crash_point("qemu.snapshot.writing", qemu=vm.pid)
            await self.migration_done(vm, "saving the device state")
            crash_point("qemu.snapshot.written")
            migrate_ms = (time.perf_counter() - migrate_start) * 1000
        except SandboxCrashed as exc:
            p.state_tmp.unlink(missing_ok=True)
            raise SandboxCrashed(
                f"the QEMU of sandbox {vm.sandbox_id} died while its snapshot was being"
                f" written: its memory is lost, its disks are kept ({exc})"
            ) from exc
        except BaseException as exc:
            # Roll back to where we were: the guest keeps running as if nothing happened.
            if was_hot and vm.qmp is not None and vm.state.live:
                with contextlib.suppress(EngineError):
                    await machine.qmp(vm, "cont")
            p.state_tmp.unlink(missing_ok=True)
            no_space = disk_full_error(vm, exc)
            if no_space is not None:
                raise no_space from exc
            raise
        full = not (base_ok and vm.meta.ram_synced)
        try:
            await self._quit(vm)
            crash_point("qemu.snapshot.qemu_quit")
            stats = await asyncio.to_thread(_make_durable, vm, base_ok)
        except BaseException as exc:
            # QEMU is (being) gone but the snapshot is not durable: nothing to resume.
            await machine.kill(vm)
            machine.apply(vm, plan(Op.LOST, vm.state, vm.sandbox_id))
            no_space = disk_full_error(vm, exc)
            if no_space is not None:
                raise no_space from exc
            raise
        settle_ms = None
        if from_template:
            settle_start = time.perf_counter()
            settled = await self._settle(vm)
            if settled is not None:
                stats, settle_ms = settled, (time.perf_counter() - settle_start) * 1000
        meta = vm.meta
        rec = snapshot.SnapshotRecord(
            generation=meta.generation + 1,
            kind="full" if full else "diff",
            created_at=time.time(),
            state_bytes=p.state.stat().st_size,
            ram_written_bytes=stats.dirty_bytes,
            ram_allocated_bytes=stats.allocated_bytes,
            total_ms=(time.perf_counter() - started) * 1000,
            migrate_ms=migrate_ms,
            sync_ms=stats.sync_ms,
            ram_in_state=not base_ok and settle_ms is None,
            settle_ms=settle_ms,
        )
        meta.record(rec)
        meta.valid = True
        await asyncio.to_thread(snapshot.save_meta, p.snapshot_meta, meta)
        crash_point("qemu.snapshot.valid")
        log.info(
            "sandbox %s cold: %s snapshot, %d B state, %s B RAM written, %.1f ms",
            vm.sandbox_id,
            rec.kind,
            rec.state_bytes,
            rec.ram_written_bytes,
            rec.total_ms,
        )

    async def _settle(self, vm: VM) -> SyncStats | None:
        """Move a clone's RAM, just snapshotted into the state stream, into a RAM file
        of its own: load the snapshot into a QEMU that never runs the guest, save its
        device state alone, sync the file. None (and the snapshot as it was) on failure.

        A clone maps its template's RAM copy-on-write, and QEMU can only leave *shared*
        RAM out of a snapshot, so its first stop streams all of it. Loading that stream
        into a file mapping costs a page fault per page (measured: 1-3 s for ~90 MiB
        on a loaded host, against 0.1-0.2 s for a restore from a RAM file), better paid
        now, by the stop, than by the request that wakes the sandbox; and the stops
        after it are diffs again."""
        p = vm.paths
        try:
            crash_point("qemu.settle.start")
            await self._net.create_tap(vm.record.net_owner)
            await machine.boot(vm, self.config, self._host.tsc_khz, incoming=True)
            await self._load_state(vm, ram_in_state=True)
            crash_point("qemu.settle.loaded")
            await self._start_save(vm, ram=False)
            await self.migration_done(vm, "saving the device state")
            await self._quit(vm)
            return await asyncio.to_thread(_settle_durable, vm)
        except Exception as exc:
            await machine.kill(vm)
            p.state_tmp.unlink(missing_ok=True)
            log.warning(
                "sandbox %s: its RAM stays in its snapshot (moving it to a file failed: %s)",
                vm.sandbox_id,
                exc,
            )
            return None
        except BaseException:
            await machine.kill(vm)
            p.state_tmp.unlink(missing_ok=True)
            raise

    async def _start_save(self, vm: VM, *, ram: bool) -> None:
        """Start migrating ``vm`` (stopped) into state.tmp: its device state, and its RAM
        too if ``ram`` (otherwise shared RAM is left out). :meth:`migration_done` waits."""
        await machine.qmp(
            vm,
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": not ram}]},
        )
        await machine.qmp(vm, "migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        fd = os.open(
            vm.paths.state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        try:
            assert vm.qmp is not None
            await vm.qmp.send_fd(fd, _SNAPSHOT_FD)
        finally:
            os.close(fd)
        await machine.qmp(vm, "migrate", {"uri": f"fd:{_SNAPSHOT_FD}"})

    async def _quit(self, vm: VM) -> None:
        """End ``vm``'s QEMU by QMP ``quit`` (killed if it lingers)."""
        assert vm.qmp is not None
        await vm.qmp.quit(timeout=self.config.qmp_timeout)
        vm.qmp = None
        if not await process.wait_gone(vm.pid or 0, vm.paths.marker, self.config.qmp_timeout):
            await process.terminate(vm.pid, vm.paths.marker)
        vm.pid = None

    async def _load_state(self, vm: VM, *, ram_in_state: bool) -> None:
        """Feed state.bin to the incoming QEMU of ``vm`` and wait until it is loaded."""
        p = vm.paths
        await machine.qmp(
            vm,
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": not ram_in_state}]},
        )
        fd = os.open(p.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert vm.qmp is not None
            await vm.qmp.send_fd(fd, _SNAPSHOT_FD)
        finally:
            os.close(fd)
        await machine.qmp(vm, "migrate-incoming", {"uri": f"fd:{_SNAPSHOT_FD}"})
        await self.migration_done(vm, "loading the device state")

    # ------------------------------------------------------------------ restore

    async def restore(self, vm: VM, *, on_bridge: bool = True) -> None:
        """cold → hot: a new QEMU maps the same RAM file and loads state.bin; its TAP on
        the bridge unless not ``on_bridge`` (a sandbox that must first take another
        identity: the caller attaches it).

        The caller applies the transition; a failure here leaves the sandbox in the
        state it started from if the guest never ran, else LOST. (A clone is started
        in two steps instead: :meth:`launch_incoming`, :meth:`run_incoming`.)"""
        p = vm.paths
        before = vm.state
        why = why_unrestorable(vm)
        if why is not None:
            raise InvalidState(f"cannot restore {vm.sandbox_id}: {why}")
        await self._net.create_tap(vm.record.net_owner, on_bridge=on_bridge)
        meta = vm.meta
        ram_in_state = meta.ram_in_state
        phases = Phases()
        crash_point("qemu.restore.tap")
        phases.mark("tap")
        ram = Path(meta.ram_template) if meta.ram_template else p.ram
        self._prefetch.start(ram, process.launch_nice.get())
        guest_ran = False
        try:
            await machine.boot(vm, self.config, self._host.tsc_khz, incoming=True)
            crash_point("qemu.restore.qemu_started")
            phases.mark("qemu")
            await self._load_state(vm, ram_in_state=ram_in_state)
            crash_point("qemu.restore.loaded")
            phases.mark("load state")
            # Only a running guest writes into the RAM file (QEMU loads no ROMs into
            # the RAM of an incoming VM): up to here the snapshot is intact, and a
            # crash leaves it restorable. From the ``cont`` on it is spent.
            guest_ran = True
            await self.spend_snapshot(vm)
            crash_point("qemu.restore.spent")
            await machine.qmp(vm, "cont")
            phases.mark("cont")
        except BaseException:
            await machine.kill(vm)
            if guest_ran:
                machine.apply(vm, plan(Op.LOST, vm.state, vm.sandbox_id))
            else:
                # The guest never ran: RAM file and disks are untouched, the snapshot
                # is still good and the sandbox stays as it was, cold (a later start
                # may work), even if a QMP failure on the way marked it crashed.
                vm.state = before
                vm.reboot = False
            raise
        if ram_in_state:
            meta.ram_in_state = False  # the RAM now lives in the file, all of it unsynced
            meta.ram_synced = False
        vm.phases = phases.done()
        log.debug("sandbox %s restored: %s", vm.sandbox_id, vm.phases)

    async def launch_incoming(self, vm: VM) -> None:
        """A new QEMU for ``vm`` that waits for its device state (``-incoming``); its
        files need only be openable (a clone's are still being filled, see
        :data:`.capture.DiskReady`). The caller kills it if it goes no further."""
        await machine.boot(vm, self.config, self._host.tsc_khz, incoming=True)

    async def run_incoming(self, vm: VM) -> None:
        """Load ``vm``'s device state into the QEMU :meth:`launch_incoming` started and
        run it (the snapshot is spent). A clone's: the caller kills it on failure."""
        meta = vm.meta
        await self._load_state(vm, ram_in_state=meta.ram_in_state)
        await self.spend_snapshot(vm)
        await machine.qmp(vm, "cont")
        if meta.ram_in_state:
            meta.ram_in_state = False  # the RAM now lives in the file, all of it unsynced
            meta.ram_synced = False

    # ------------------------------------------------------------------ reboot

    async def reboot(self, vm: VM) -> None:
        """cold, no usable snapshot → hot: a new QEMU boots from the sandbox's own disks.

        Its address, MAC, TAP, token, config drive and volumes are the ones it had;
        the guest sees a disk it set up before and does not provision it again
        (:mod:`kiln.guest.started`). A failure leaves it as it was (the next use
        tries again), unless its disks turn out to be gone: then it is in error."""
        p = vm.paths
        started = time.perf_counter()
        missing = await asyncio.to_thread(why_unbootable, vm)
        if missing is not None:
            vm.problem = missing
            machine.apply(vm, plan(Op.LOST, vm.state, vm.sandbox_id))
            raise SandboxCrashed(f"sandbox {vm.sandbox_id} cannot boot again: {missing}")
        await late_drive.bring_up_to_date(vm, self._write_drive)
        await self._net.create_tap(vm.record.net_owner)
        await self._net.pin_neighbour(vm.record.ip, vm.record.mac)
        # A fresh machine starts from zeroed memory: the old RAM (garbage to the new
        # kernel) is dropped, and the stale snapshot with it.
        meta = vm.meta
        meta.valid = False
        meta.ram_in_state = False
        meta.ram_synced = False
        meta.ram_template = None
        meta.ram_inode = await asyncio.to_thread(
            snapshot.create_ram_file, p.ram, vm.record.spec.memory_mb << 20
        )
        await asyncio.to_thread(snapshot.save_meta, p.snapshot_meta, meta)
        try:
            await machine.boot(vm, self.config, self._host.tsc_khz, incoming=False)
            await machine.wait_agent(vm, self.config, self.config.boot_timeout)
        except BaseException:
            await machine.kill(vm)
            raise
        vm.reboot = False
        vm.phases = {"total": round((time.perf_counter() - started) * 1000, 2)}
        log.info("sandbox %s rebooted from its disks in %.0f ms", vm.sandbox_id, vm.phases["total"])

    async def spend_snapshot(self, vm: VM) -> None:
        """Record that the snapshot is no longer valid: the guest is about to run and
        write into the RAM file it shares with it."""
        if vm.meta.valid:
            vm.meta.valid = False
            await asyncio.to_thread(snapshot.save_meta, vm.paths.snapshot_meta, vm.meta)

    async def migration_done(self, vm: VM, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.snapshot_timeout
        while True:
            status: dict[str, Any] = await machine.qmp(vm, "query-migrate")
            state = status.get("status")
            if state == "completed":
                return status
            if state in ("failed", "cancelled"):
                raise EngineError(
                    f"{what} of {vm.sandbox_id} failed: {status.get('error-desc', state)}"
                )
            if time.monotonic() > deadline:
                raise EngineError(f"{what} of {vm.sandbox_id} did not finish in time")
            await asyncio.sleep(_MIGRATE_POLL)


#: Below this much free space on the sandbox's file system a failed snapshot write is
#: put down to a full disk (QEMU reports a failed migration without the errno).
_FULL_BYTES: Final = 4 << 20


def disk_full_error(vm: VM, exc: BaseException) -> EngineError | None:
    """A clear error for a snapshot that failed because the disk is full; else None."""
    if not isinstance(exc, Exception):
        return None
    nospace = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    try:
        st = os.statvfs(vm.paths.root)
    except OSError:
        return None
    if not nospace and st.f_bavail * st.f_frsize >= _FULL_BYTES:
        return None
    return EngineError(
        f"cannot snapshot sandbox {vm.sandbox_id}: the disk holding {vm.paths.root} is full"
        f" ({st.f_bavail * st.f_frsize >> 20} MiB free; {exc})"
    )


def why_unrestorable(vm: VM) -> str | None:
    """Why the snapshot cannot be restored, or None if it can."""
    p = vm.paths
    if not vm.meta.valid:
        return "no valid snapshot (it was never taken or a restore consumed it)"
    if not p.state.exists():
        return f"snapshot state {p.state} is missing"
    if vm.meta.ram_template is not None:
        if not Path(vm.meta.ram_template).exists():
            return f"template RAM file {vm.meta.ram_template} is missing"
        return None
    if not p.ram.exists():
        return f"snapshot RAM file {p.ram} is missing"
    if not vm.meta.ram_in_state and snapshot.ram_inode(p.ram) != vm.meta.ram_inode:
        return "the RAM file was replaced since the snapshot"
    return None


def _settle_durable(vm: VM) -> snapshot.SyncStats:
    """Blocking: the RAM file on stable storage, then the device state replaces the
    snapshot that carried the RAM (so no crash finds a state without its RAM)."""
    p = vm.paths
    stats = snapshot.sync_ram_file(p.ram)
    snapshot.fsync_path(p.state_tmp)
    os.replace(p.state_tmp, p.state)
    snapshot.fsync_dir(p.root)
    vm.meta.ram_in_state = False
    vm.meta.ram_synced = True
    return stats


def _make_durable(vm: VM, base_ok: bool) -> snapshot.SyncStats:
    """Blocking: state.bin, RAM file and disks on stable storage; page cache freed."""
    p = vm.paths
    snapshot.fsync_path(p.state_tmp)
    os.replace(p.state_tmp, p.state)
    if base_ok:
        stats = snapshot.sync_ram_file(p.ram)
        vm.meta.ram_synced = True
    else:
        # RAM is in state.bin; the restore loads it into a fresh file of its own.
        p.ram.unlink(missing_ok=True)
        vm.meta.ram_inode = snapshot.create_ram_file(p.ram, vm.record.spec.memory_mb << 20)
        vm.meta.ram_synced = False
        vm.meta.ram_template = None
        stats = snapshot.SyncStats(None, 0, 0.0)
    for drive in vm.record.drives:
        snapshot.fsync_path(Path(drive.path))
    snapshot.fsync_dir(p.root)
    return stats
