"""Surviving a daemon restart. QEMU runs daemonized in its own session, so it
outlives the daemon: the state the daemon stores per sandbox
(:func:`export_state`) is enough to re-adopt its live QEMU, else its valid
snapshot, else -- its QEMU gone with its memory, as after a host reboot -- its
disks, from which its next use boots it again (:data:`Found.DISK`; only a
sandbox whose disks are gone is in error); and whatever no known sandbox owns
is removed afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from kiln.network import NetworkError

from ..base import SANDBOX_ID_RE
from ..boots import STATE_KEY, LastBoot
from ..errors import EngineError, InvalidState
from ..states import ADOPTED, Found
from . import disks, machine, process, snapshot, templates
from .config import QemuConfig
from .host import Host
from .hostnet import HostNet
from .layout import Paths, Record
from .machine import ENGINE_NAME, VM, why_unbootable
from .qmp import QMP
from .thermal import why_unrestorable

log = logging.getLogger(__name__)

STATE_VERSION: Final = 1
#: QMP runstates of a QEMU whose vCPUs are stopped but which can ``cont``.
_PAUSED_RUNSTATES: Final = frozenset({"paused", "postmigrate", "finish-migrate", "prelaunch"})


def export_state(vm: VM) -> dict[str, Any]:
    return {
        "engine": ENGINE_NAME,
        "version": STATE_VERSION,
        "sandbox_id": vm.sandbox_id,
        "record": vm.record.to_json(),
        "pid": vm.pid,
        "status": str(vm.state.status),
        "thermal": str(vm.state.thermal),
        "snapshot_valid": vm.meta.valid,
        STATE_KEY: None if vm.last_boot is None else vm.last_boot.to_json(),
    }


def record_from_state(state: Mapping[str, Any]) -> Record:
    try:
        return Record.from_json(dict(state["record"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidState(f"not a QEMU sandbox state: {exc!r}") from exc


class Recovery:
    """``vms`` is the engine's (read only here); ``building_templates`` says whether a
    template build of this engine is under way (its files are not orphans then)."""

    def __init__(
        self,
        config: QemuConfig,
        host: Host,
        net: HostNet,
        vms: Mapping[str, VM],
        building_templates: Callable[[], bool],
        *,
        pooled: Callable[[], list[VM]] = list,
    ) -> None:
        self.config = config
        self._host = host
        self._net = net
        self._vms = vms
        self._building_templates = building_templates
        #: The warm pool's members: no sandboxes, but not orphans either.
        self._pooled = pooled

    async def adopt(self, record: Record, pid_hint: object, last_boot: object = None) -> VM:
        """The sandbox of ``record`` in whatever state survived (``last_boot``: as
        exported). The caller adds it to ``vms``."""
        sid = record.spec.sandbox_id
        await self._host.ensure_ready(None)
        paths = Paths(Path(record.dir))
        meta = snapshot.load_meta(paths.snapshot_meta)
        vm = VM(
            record=record,
            paths=paths,
            client=machine.client_for(record, self.config),
            state=ADOPTED[Found.NOTHING],  # until _survivor vouches for more
            meta=meta,
            last_boot=LastBoot.from_json(last_boot),
        )
        try:
            self._net.pool.mark_in_use(record.ip, sid)
        except NetworkError as exc:
            log.error("cannot re-mark %s for %s: %s", record.ip, sid, exc)
            return vm
        try:
            await self._net.admit(record.spec, record.ip, record.tap, record.mac)
        except EngineError as exc:
            log.error("sandbox %s: %s", sid, exc)
        if paths.root.is_dir():
            vm.state = ADOPTED[await self._survivor(vm, pid_hint)]
        else:
            vm.problem = f"its directory {paths.root} is gone, and its disks with it"
            log.error("sandbox %s cannot be recovered: %s", sid, vm.problem)
            vm.state = ADOPTED[Found.GONE]
        return vm

    async def _survivor(self, vm: VM, pid_hint: object) -> Found:
        """What survived of the sandbox: its QEMU (running or paused), else a usable
        snapshot, else its disks (either way its TAP re-created), else nothing."""
        paths = vm.paths
        pid = process.read_pid(paths.pidfile)
        if pid is None and isinstance(pid_hint, int):
            pid = pid_hint
        if process.pid_alive(pid, paths.marker):
            vm.pid = pid
            vm.qmp = QMP(vm.sandbox_id, paths.qmp_socket, self.config.qmp_timeout)
            try:
                await vm.qmp.connect()
                status = await vm.qmp.execute("query-status")
            except EngineError as exc:
                log.warning("QEMU of %s does not answer QMP (%s); killing it", vm.sandbox_id, exc)
                await machine.kill(vm)
            else:
                runstate = status.get("status")
                if status.get("running"):
                    return Found.RUNNING
                if runstate in _PAUSED_RUNSTATES:
                    return Found.PAUSED
                log.warning("QEMU of %s is in state %s; killing it", vm.sandbox_id, runstate)
                await machine.kill(vm)
        # No live QEMU: a valid snapshot makes it cold; without one, its disks do (a
        # machine that lost power boots again from them), and without those it is lost.
        found = Found.SNAPSHOT
        why = why_unrestorable(vm)
        if why is not None:
            missing = await asyncio.to_thread(why_unbootable, vm)
            if missing is not None:
                vm.problem = missing
                log.error("sandbox %s cannot be recovered: %s", vm.sandbox_id, missing)
                return Found.GONE
            log.warning(
                "sandbox %s: its QEMU is gone and it has %s; it boots again from its disks"
                " on its next use (rebooted: files kept, processes lost)",
                vm.sandbox_id,
                why,
            )
            vm.reboot = True
            found = Found.DISK
        await self._net.recreate_tap(vm.record.net_owner)
        await self._net.pin_neighbour(vm.record.ip, vm.record.mac)  # gone after a host reboot
        return found

    async def cleanup_orphans(self) -> list[str]:
        """Remove what belongs to no known sandbox: QEMU processes, TAPs, directories.

        Call after every import of a recovery. Returns what was removed.
        """
        await self._host.ensure_ready(None)
        vms = self._vms
        known = {sid for sid, vm in vms.items() if not vm.destroyed}
        live = [vms[sid] for sid in known] + self._pooled()
        # A sandbox taken from the pool lives in its member's directory.
        dirs = {vm.paths.root.name for vm in live}
        removed: list[str] = []
        sandboxes = self.config.sandboxes_dir
        for entry in sorted(sandboxes.iterdir()) if sandboxes.is_dir() else []:
            if entry.name in known or entry.name in dirs or not entry.is_dir():
                continue
            await self.destroy_leftovers(entry.name)
            removed.append(f"sandbox dir {entry.name}")
        marker = f"{sandboxes}/"
        sandbox_pids = process.find_processes(marker)
        for pid in sandbox_pids:
            owner = next(
                (vm for vm in live if process.pid_alive(pid, vm.paths.marker)),
                None,
            )
            if owner is None:
                await process.terminate(pid, marker)
                removed.append(f"qemu pid {pid}")
        if not self._building_templates():
            # No build of ours runs: a template QEMU or half-built directory is a
            # leftover of a daemon that died mid-build.
            tpl_marker = f"{self.config.templates_dir}/"
            for pid in process.find_processes(tpl_marker):
                if pid in sandbox_pids:
                    continue  # a clone: it maps its template's RAM, see above for its fate
                await process.terminate(pid, tpl_marker)
                removed.append(f"template qemu pid {pid}")
            for entry in await asyncio.to_thread(templates.unfinished, self.config.templates_dir):
                await asyncio.to_thread(disks.remove_tree, entry)
                removed.append(f"unfinished template {entry.name}")
        taps = {vm.record.tap for vm in live}
        try:
            gone = await asyncio.to_thread(self._net.network.cleanup_orphans, taps)
        except NetworkError as exc:
            log.warning("orphan TAP cleanup failed: %s", exc)
            gone = []
        removed += [f"tap {t}" for t in gone]
        ips = {vm.record.ip for vm in live}
        removed += [f"pin {ip}" for ip in await self._net.forget_stale_pins(ips)]
        return removed

    async def destroy_leftovers(self, sandbox_id: str) -> None:
        """Destroy of an id we do not hold: clean whatever a previous run left on disk."""
        if not SANDBOX_ID_RE.match(sandbox_id):
            return
        root = self.config.sandboxes_dir / sandbox_id
        if not root.is_dir():
            return
        paths = Paths(root)
        for pid in process.find_processes(paths.marker):
            await process.terminate(pid, paths.marker)
        try:
            record = Record.load(paths.record)
        except (OSError, ValueError, KeyError, TypeError):
            record = None
        if record is not None:
            await self._net.delete_tap(record.tap)
            owner = self._net.pool.owner_of(record.ip)
            if owner == sandbox_id:
                await self._net.release_ip(record.ip)
            elif owner is None:
                # A previous run's sandbox: nobody holds its address now, but its
                # pinned ARP entry outlived that run. (Another owner's pin stays.)
                await self._net.forget_neighbour(record.ip)
        await asyncio.to_thread(disks.remove_tree, root)
