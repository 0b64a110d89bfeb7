"""The clone half of a fork or of a create from a saved image: a new sandbox from a
captured snapshot (:mod:`.capture`), with its own identity.

The clone is an ordinary cold sandbox with a valid snapshot and its own address,
MAC, TAP, token and config drive (of the origin drive's size: the guest kernel
knows it), restored like any other. Its memory still says it is the origin, so
its TAP stays off the bridge while it learns otherwise (:mod:`.identity`: a frame
on that TAP, else an identity block on the config drive) and the agent takes
the new identity -- clock, RNG reseed, hostname, eth0 MAC/address/route, token
(see :mod:`kiln.guest.reidentify`). Then the TAP joins the bridge and the engine
waits for the agent at the new address, with the new token, as after any create.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from kiln.guest import forkframe

from ..base import SandboxSpec
from ..boots import BootReason, LastBoot
from ..errors import EngineError, InvalidSpec, InvalidState
from ..guard import Admission
from ..states import CREATED
from ..undo import Undo
from . import disks, identity, machine, snapshot, templates
from .argv import Drive
from .capture import DiskReady
from .clock import set_clock
from .config import QemuConfig
from .hostnet import HostNet
from .layout import Paths, Record, guest_config
from .machine import VM, Phases
from .thermal import ThermalControl

log = logging.getLogger(__name__)

_SEED_BYTES: Final = 64
#: What of the clone's guest config its identity block carries (kiln.guest.reidentify).
_IDENTITY_KEYS: Final = ("sandbox_id", "hostname", "token", "dns", "network")

#: Fills a new clone's directory with the captured files; the meta that restores them.
#: It may call its DiskReady as soon as the clone's QEMU can start (the clone then
#: starts it at once), else the QEMU starts once it returns.
Fill = Callable[[VM, DiskReady], Awaitable[snapshot.SnapshotMeta]]


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """What a clone is made from: the captured sandbox's record (drives, kernel,
    accelerator, shape) and its config drive's size (the guest kernel knows it)."""

    record: Record
    drive_size: int


class Cloner:
    """Makes sandboxes from captured snapshots; the caller adds each to ``vms``."""

    def __init__(
        self,
        config: QemuConfig,
        net: HostNet,
        thermal: ThermalControl,
        vms: Mapping[str, VM],
    ) -> None:
        self.config = config
        self._net = net
        self._thermal = thermal
        self._vms = vms
        self._cloning: set[str] = set()

    def check(self, origin: Origin, spec: SandboxSpec, what: str) -> None:
        """InvalidSpec/InvalidState before anything is made (``what``: "a fork")."""
        spec.validate()
        src = origin.record.spec
        if spec.volumes:
            raise InvalidSpec(f"{what} gets no volumes of its own")
        if (spec.cpus, spec.memory_mb, spec.image) != (src.cpus, src.memory_mb, src.image):
            raise InvalidSpec(
                f"{what} has the vCPUs, memory and image of its origin"
                f" ({src.cpus} vCPUs, {src.memory_mb} MB, image {src.image!r})"
            )
        if spec.sandbox_id in self._vms or spec.sandbox_id in self._cloning:
            raise InvalidState(f"sandbox {spec.sandbox_id!r} already exists")

    async def clone(self, origin: Origin, spec: SandboxSpec, fill: Fill, what: str) -> VM:
        """The clone, hot and answering as itself (``check`` first)."""
        sid = spec.sandbox_id
        self._cloning.add(sid)
        undo = Undo()
        phases = Phases()
        try:
            with machine.os_errors(f"making {sid} ({what})"):
                vm, config = self._new(origin, spec, undo)
                # Its network and config drive are made while its files are copied.
                setup = asyncio.create_task(self._set_up(vm, config, origin, undo))
                undo.push("stop QEMU", lambda: machine.kill(vm))
                try:
                    vm.meta = await self._fill_and_launch(vm, fill, setup)
                except BaseException:
                    await asyncio.gather(setup, return_exceptions=True)  # its undo is in
                    raise
                admission, frames = await setup
                try:
                    await asyncio.to_thread(snapshot.save_meta, vm.paths.snapshot_meta, vm.meta)
                    phases.mark("net+copy+qemu")
                    await admission.wait()
                    await self._thermal.run_incoming(vm)
                    phases.mark("restore")
                    fields: dict[str, Any] = {k: config[k] for k in _IDENTITY_KEYS if k in config}
                    how = await identity.tell(vm, frames, fields, origin.record.token)
                finally:
                    frames.close()
                phases.mark("identity")
                await self._net.set_tap_on_bridge(vm.record.tap, True)
                phases.mark("attach")
                # The identity's clock is some milliseconds old by now (seconds if it
                # went by the config drive): the first request sets it exactly.
                await machine.wait_agent(
                    vm,
                    self.config,
                    min(self.config.boot_timeout, identity.TIMEOUT),
                    lambda probe: set_clock(probe, timeout=self.config.agent_timeout),
                )
                phases.mark("agent+clock")
        except BaseException:
            await undo.run()
            raise
        finally:
            self._cloning.discard(sid)
        vm.phases = phases.done()
        vm.last_boot = LastBoot.now(BootReason.CREATED)
        log.info("sandbox %s made (%s; identity by %s): %s", sid, what, how, vm.phases)
        return vm

    async def _fill_and_launch(
        self, vm: VM, fill: Fill, setup: asyncio.Task[tuple[Admission, socket.socket]]
    ) -> snapshot.SnapshotMeta:
        """The clone's files filled and its QEMU started (waiting for the device
        state) once ``setup`` made its TAP and config drive, side by side with the
        fill once it says which RAM file that QEMU maps; the meta of the filled
        files. The caller's undo stops the QEMU on failure."""
        launch: asyncio.Task[None] | None = None
        launched_with: str | None = None

        async def start() -> None:
            await asyncio.shield(setup)
            await self._thermal.launch_incoming(vm)

        def disk_ready(ram_template: str | None) -> None:
            nonlocal launch, launched_with
            launched_with = ram_template
            vm.meta = snapshot.SnapshotMeta(ram_template=ram_template)
            launch = asyncio.create_task(start(), name=f"kiln-launch-{vm.sandbox_id}")

        try:
            meta = await fill(vm, disk_ready)
        except BaseException:
            if launch is not None:
                await asyncio.gather(launch, return_exceptions=True)
            raise
        if launch is not None:
            await launch
            if meta.ram_template == launched_with:
                return meta
            # The source changed between the disk and the RAM (another RAM file).
            await machine.kill(vm)
        vm.meta = meta
        await start()
        return meta

    def _new(self, origin: Origin, spec: SandboxSpec, undo: Undo) -> tuple[VM, dict[str, Any]]:
        """The clone's address, directory and record (not yet on disk), and its guest
        config; what its files are copied into."""
        sid = spec.sandbox_id
        net = self._net
        ip = net.allocate_ip(sid)
        undo.push("release IP", lambda: net.release_ip(ip))
        root = self.config.sandboxes_dir / sid
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            raise InvalidState(
                f"{root} is left over from an earlier run; destroy {sid!r} first"
            ) from None
        undo.push("remove directory", lambda: asyncio.to_thread(disks.remove_tree, root))
        paths = Paths(root)
        drives = []
        for i, drive in enumerate(origin.record.drives):
            if i == 0:
                name = Path(drive.path).name
                drives.append(dataclasses.replace(drive, path=str(root / name)))
            elif i == 1:
                drives.append(dataclasses.replace(drive, path=str(paths.config_drive)))
            else:  # a template's spare slot (no volumes: see check)
                drives.append(Drive(str(paths.slot(i - 2))))
        src = origin.record
        record = Record(
            spec=spec,
            dir=str(root),
            token=secrets.token_hex(16),
            ip=ip,
            tap=net.network.tap_name(sid),
            mac=net.network.mac_for(sid),
            accel=src.accel,
            kernel=src.kernel,
            initrd=src.initrd,
            image_digest=src.image_digest,
            drives=tuple(drives),
            created_at=time.time(),
        )
        config = guest_config(
            record, dict(net.network.guest_network(ip, sid)), [], self.config.guest_user
        )
        config["clock_ns"] = time.time_ns()
        config["seed"] = base64.b64encode(secrets.token_bytes(_SEED_BYTES)).decode()
        vm = VM(
            record=record,
            paths=paths,
            client=machine.client_for(record, self.config),
            state=CREATED.next,
            meta=snapshot.SnapshotMeta(),
        )
        return vm, config

    async def _set_up(
        self, vm: VM, config: dict[str, Any], origin: Origin, undo: Undo
    ) -> tuple[Admission, socket.socket]:
        """TAP, pinned ARP entry, firewall admission, config drive, template slots and
        record file of the clone: what its QEMU needs to start; and the packet socket
        its identity frames go through (opened before the clone runs: its answer
        cannot come too early), which the caller closes."""
        net = self._net
        record = vm.record
        sid = record.spec.sandbox_id
        # Off the bridge until the clone has its own addresses (see identity).
        tap = await net.create_tap(sid, on_bridge=False)
        undo.push("delete TAP", lambda: net.delete_tap(tap))
        if tap != record.tap:
            raise EngineError(f"the TAP of {sid} is {tap}, not {record.tap}")
        await net.pin_neighbour(record.ip, record.mac)
        admission = net.guard.admit_soon(record.spec, record.ip, port=tap, mac=record.mac)
        undo.push("remove the firewall rules", admission.undo)
        for drive in record.drives[2:]:
            await asyncio.to_thread(templates.write_slot_placeholder, Path(drive.path))
        await disks.make_config_drive(vm.paths.config_drive, config, origin.drive_size)
        await asyncio.to_thread(snapshot.write_json_atomic, vm.paths.record, record.to_json())
        frames = await net.packet_socket(tap, forkframe.ETHERTYPE)
        undo.push("close the frame socket", lambda: _close(frames))
        return admission, frames


async def _close(sock: socket.socket) -> None:
    sock.close()
