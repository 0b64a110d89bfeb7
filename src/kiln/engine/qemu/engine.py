"""The QEMU microVM engine: :class:`QemuEngine`, the :class:`~kiln.engine.base.Engine`
the rest of kiln sees. It holds the sandboxes and hands the work to

    provision   create: spec check, disks, boot or template restore, undo on failure
    thermal     pause/resume, snapshot to disk and restore, the guest clock
    capture     a sandbox's disk, memory and device state copied (a brief pause)
    clone       a new sandbox from a capture, with its own identity
    identity    telling a running clone who it is (a frame on its TAP, else the config drive)
    fork        capture into the new sandbox's directory, then clone
    saved       saved images: capture into a directory of their own; create = clone
    recovery    export_state/import_state, re-adopting what survived, orphan cleanup
    adoption    a sandbox of a lost cluster node taken over (with a shared_dir)
    hostnet     guest addresses, TAP devices, pinned ARP entries
    host        set up once: directories, bridge, accelerator, pinned images
    pool        the warm pool: paused sandboxes per shape that a create takes over
    machine     one sandbox's QEMU: boot, QMP, kill, noticing a death

One QEMU process per sandbox, started with ``-daemonize`` in its own session
(inside the configured network namespace), so it outlives a daemon crash and
:meth:`QemuEngine.import_state` can re-adopt it. Everything inside the guest
goes through the guest agent over TCP on the sandbox's TAP network.

States: every transition is planned by :mod:`kiln.engine.states` and only its
``next`` state is ever assigned (:func:`.machine.apply`). Each sandbox has an
asyncio lock held only while its state is checked or changed (QMP calls,
snapshot, restore) -- never across an agent call.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.agent_client import AgentClient, ForwardStream
from kiln.faults import crash_point
from kiln.network import IPPool, Network
from kiln.network.firewall import Firewall

from ..base import SandboxInfo, SandboxSpec, SavedImage, Thermal
from ..boots import STATE_KEY
from ..errors import InvalidSpec, InvalidState, SandboxNotFound
from ..ports import listening_ports
from ..states import Op
from . import disks, machine, process, recovery, snapshot
from .accel import AccelDecision
from .adoption import Adopter
from .capture import Capturer
from .clone import Cloner
from .config import QemuConfig
from .fork import Forker
from .host import Host
from .hostnet import HostNet
from .layout import Paths, Record
from .machine import ENGINE_NAME, VM
from .pool import Pool
from .provision import Provisioner, volume_path
from .recovery import Recovery
from .saved import SavedImages
from .thermal import ThermalControl

log = logging.getLogger(__name__)


class QemuEngine:
    """Sandboxes as QEMU microVMs. Construct, then use; no I/O in the constructor.

    Engine-wide setup (network bridge, accelerator choice, image pinning) happens
    lazily on the first :meth:`create` or :meth:`import_state`.
    """

    name = ENGINE_NAME

    def __init__(self, config: QemuConfig | None = None, firewall: Firewall | None = None) -> None:
        self.config = config if config is not None else QemuConfig()
        self._net = HostNet(self.config.network, firewall)
        self._host = Host(self.config, self._net.network)
        # Only this class adds and removes sandboxes; the helpers read it.
        self._vms: dict[str, VM] = {}
        self._thermal = ThermalControl(self.config, self._host, self._net, self._write_drive)
        self._provision = Provisioner(self.config, self._host, self._net, self._thermal, self._vms)
        self._pool = Pool(
            self.config,
            self._net,
            self._provision.create,
            self._provision.reserving,
            self._provision.write_config_drive,
        )
        capturer = Capturer(self._thermal)
        cloner = Cloner(self.config, self._net, self._thermal, self._vms)
        self._fork = Forker(capturer, cloner)
        self._saved = SavedImages(self.config, capturer, cloner)
        self._adopter = Adopter(self.config, self._host, self._net, self._thermal)
        self._recovery = Recovery(
            self.config,
            self._host,
            self._net,
            self._vms,
            self._provision.building_templates,
            pooled=self._pool.members,
        )

    async def _write_drive(self, record: Record, dest: Path) -> None:
        # The provisioner writes config drives; it is made after (and with) thermal.
        await self._provision.write_config_drive(record, dest)

    @property
    def accel(self) -> AccelDecision | None:
        """The accelerator decision (None until the first create/import)."""
        return self._host.accel

    @property
    def network(self) -> Network:
        return self._net.network

    @property
    def pool(self) -> IPPool:
        return self._net.pool

    # ------------------------------------------------------------------ lookup, info

    def _get(self, sandbox_id: str) -> VM:
        vm = self._vms.get(sandbox_id)
        if vm is None or vm.destroyed:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r} in the QEMU engine")
        return vm

    def thermal(self, sandbox_id: str) -> Thermal:
        vm = self._get(sandbox_id)
        machine.observe(vm)
        return vm.state.thermal

    def info(self, sandbox_id: str) -> SandboxInfo:
        vm = self._get(sandbox_id)
        machine.observe(vm)
        return machine.sandbox_info(vm)

    def list(self) -> list[SandboxInfo]:
        out = []
        for vm in list(self._vms.values()):
            if not vm.destroyed:
                machine.observe(vm)
                out.append(machine.sandbox_info(vm))
        return out

    def client(self, sandbox_id: str) -> AgentClient:
        """The agent client of a sandbox without waking it (for callers that know)."""
        return self._get(sandbox_id).client

    def snapshot_info(self, sandbox_id: str) -> snapshot.SnapshotMeta:
        """Snapshot validity and the measurements of the last stops."""
        return self._get(sandbox_id).meta

    def paths(self, sandbox_id: str) -> Paths:
        return self._get(sandbox_id).paths

    def pid(self, sandbox_id: str) -> int | None:
        return self._get(sandbox_id).pid

    def last_phases(self, sandbox_id: str) -> dict[str, float]:
        """Milliseconds per phase of the sandbox's last create or restore."""
        return dict(self._get(sandbox_id).phases)

    # ------------------------------------------------------------------ create, destroy

    @property
    def warm_pool(self) -> Pool:
        return self._pool

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        if spec.snapshot is not None:
            vm = await self._create_from_saved(spec)
        else:
            vm = await self._pool.claim(spec) or await self._provision.create(spec)
        self._vms[vm.sandbox_id] = vm
        return machine.sandbox_info(vm)

    async def _create_from_saved(self, spec: SandboxSpec) -> VM:
        spec.validate()
        if spec.engine is not None and spec.engine != self.name:
            raise InvalidSpec(f"spec for engine {spec.engine!r} given to {self.name!r}")
        # The host's network and accelerator, as any create (a restarted daemon may
        # make nothing else first).
        await self._host.ensure_ready(await self._host.image(spec.image))
        assert self._host.accel is not None
        return await self._saved.create(spec, str(self._host.accel.accel))

    async def save_image(self, sandbox_id: str, image_id: str) -> SavedImage:
        """Disk, memory and device state of the sandbox under ``saved/<image_id>``
        (see :mod:`.saved`); a hot sandbox stands still while its files are copied."""
        return await self._saved.save(self._get(sandbox_id), image_id)

    async def delete_saved_image(self, image_id: str) -> None:
        await self._saved.delete(image_id)

    async def fork(self, source_id: str, spec: SandboxSpec) -> SandboxInfo:
        """A running copy of ``source_id`` (see :mod:`.fork`)."""
        source = self._get(source_id)
        vm = await self._fork.fork(source, spec)
        self._vms[vm.sandbox_id] = vm
        return machine.sandbox_info(vm)

    @property
    def last_fork_pause_ms(self) -> float | None:
        """How long the last fork's or save's hot source stood still (None: it was cold)."""
        return self._fork.last_pause_ms

    async def prepare(self, spec: SandboxSpec) -> None:
        """Image, network and the template of ``spec``'s shape, so that the first
        create of that shape is as fast as the next ones."""
        await self._provision.prepare(spec)
        self._pool.start(spec)

    async def destroy(self, sandbox_id: str) -> None:
        vm = self._vms.get(sandbox_id)
        if vm is None:
            await self._recovery.destroy_leftovers(sandbox_id)
            return
        async with vm.lock:
            if vm.destroyed:
                return
            vm.destroyed = True
            await machine.cancel_clock(vm)
            try:
                await machine.kill(vm)
                for pid in process.find_processes(vm.paths.marker):
                    await process.terminate(pid, vm.paths.marker)
                crash_point("qemu.destroy.killed")
            finally:
                await self._net.guard.release(sandbox_id)
                await self._net.delete_tap(vm.record.tap)
                await self._net.release_ip(vm.record.ip)
                crash_point("qemu.destroy.net")
                await asyncio.to_thread(disks.remove_tree, vm.paths.root)
                crash_point("qemu.destroy.disks")
                self._vms.pop(sandbox_id, None)

    async def delete_volume(self, volume_id: str) -> None:
        """Remove the volume's ext4 file (``<volumes_dir>/<id>.ext4``)."""
        for vm in self._vms.values():
            if not vm.destroyed and volume_id in vm.record.volume_paths:
                raise InvalidState(f"volume {volume_id} is attached to {vm.sandbox_id}")
        with (
            machine.os_errors(f"delete volume {volume_id}"),
            contextlib.suppress(FileNotFoundError),
        ):
            await asyncio.to_thread(os.unlink, volume_path(self.config, volume_id))

    # ------------------------------------------------------------------ thermal

    async def pause(self, sandbox_id: str) -> None:
        await self._thermal.transition(self._get(sandbox_id), Op.PAUSE)

    async def resume(self, sandbox_id: str) -> None:
        """warm → hot. Returns once the vCPUs run; the guest clock is set in the
        background, and :meth:`ensure_hot` / :meth:`agent` wait for that."""
        await self._thermal.transition(self._get(sandbox_id), Op.RESUME)

    async def ensure_hot(self, sandbox_id: str) -> None:
        await self._thermal.transition(self._get(sandbox_id), Op.ENSURE_HOT)

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        # The cold step: the engine cannot tell the user's stop from the thermal
        # manager's, and never records "stopped" (the store does).
        vm = await self._thermal.transition(self._get(sandbox_id), Op.COOL)
        return machine.sandbox_info(vm)

    async def start(self, sandbox_id: str) -> SandboxInfo:
        vm = await self._thermal.transition(self._get(sandbox_id), Op.START)
        return machine.sandbox_info(vm)

    async def agent(self, sandbox_id: str) -> AgentClient:
        vm = await self._thermal.transition(self._get(sandbox_id), Op.ENSURE_HOT)
        return vm.client

    async def tunnel(self, sandbox_id: str, port: int) -> ForwardStream:
        """A raw byte stream to ``127.0.0.1:port`` in the sandbox (the agent's forward).

        Agent errors (``ForwardError`` when nothing listens) pass through unchanged.
        """
        client = await self.agent(sandbox_id)
        return await client.forward(port)

    async def listening_ports(self, sandbox_id: str) -> builtins.list[int]:
        return await listening_ports(await self.agent(sandbox_id))

    # ------------------------------------------------------------------ recovery

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        vm = self._get(sandbox_id)
        machine.observe(vm)
        return recovery.export_state(vm)

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        """Re-adopt a sandbox: its live QEMU, else its valid snapshot, else its disks
        (its next use boots it: a reboot), else it is in error (its disks are gone)."""
        record = recovery.record_from_state(state)
        sid = record.spec.sandbox_id
        if sid in self._vms and not self._vms[sid].destroyed:
            return self.info(sid)
        vm = await self._recovery.adopt(record, state.get("pid"), state.get(STATE_KEY))
        self._vms[sid] = vm
        return machine.sandbox_info(vm)

    async def adopt(self, state: Mapping[str, Any], *, hot: bool = True) -> SandboxInfo:
        """Take over a sandbox of a lost node (``state``: as that node exported it;
        see :mod:`.adoption`): restored here when it had a valid snapshot (hot; or,
        not ``hot`` and its network unchanged, left cold), else cold and booting
        from its disks on its next use. InvalidState when it cannot
        move here (no shared_dir, its files not in it, its QEMU still running)."""
        record = recovery.record_from_state(state)
        sid = record.spec.sandbox_id
        if sid in self._vms and not self._vms[sid].destroyed:
            raise InvalidState(f"sandbox {sid!r} is already this node's")
        vm = await self._adopter.adopt(record, state.get(STATE_KEY), hot=hot)
        self._vms[sid] = vm
        return machine.sandbox_info(vm)

    async def release(self, sandbox_id: str) -> dict[str, Any]:
        """Give a cold sandbox up to another node (a drain): its TAP, address and
        firewall rules go, its directory stays in the shared directory for that
        node's :meth:`adopt`. Returns the state to adopt."""
        vm = self._get(sandbox_id)
        if self.config.shared_dir is None:
            raise InvalidState(f"sandbox {sandbox_id} cannot move: this node has no shared_dir")
        async with vm.lock:
            machine.observe(vm)
            if vm.destroyed or vm.state.live:
                raise InvalidState(
                    f"sandbox {sandbox_id} is {vm.state.thermal}; only a cold one moves"
                )
            state = recovery.export_state(vm)
            vm.destroyed = True
            await self._net.guard.release(sandbox_id)
            await self._net.delete_tap(vm.record.tap)
            await self._net.release_ip(vm.record.ip)
            self._vms.pop(sandbox_id, None)
        return state

    async def cleanup_orphans(self) -> builtins.list[str]:
        """Remove what belongs to no known sandbox: QEMU processes, TAPs, directories;
        and saves a crash left unfinished.

        Call after every :meth:`import_state` of a recovery. Returns what was removed.
        """
        removed = await self._recovery.cleanup_orphans()
        return removed + await self._saved.remove_unfinished()

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Destroy the warm pool; drop QMP connections, the network worker and the RAM
        pre-reads; sandboxes' QEMU processes keep running."""
        await self._pool.close()
        self._host.closed = True
        for vm in list(self._vms.values()):
            await machine.cancel_clock(vm)
            await machine.drop_qmp(vm)
        await self._thermal.close()
        await self._net.close()


__all__ = ["ENGINE_NAME", "QemuEngine"]
