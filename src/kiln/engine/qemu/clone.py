"""The clone half of a fork or of a create from a saved image: a new sandbox from a
captured snapshot (:mod:`.capture`), with its own identity.

The clone is an ordinary cold sandbox with a valid snapshot and its own address,
MAC, TAP, token and config drive (of the origin drive's size: the guest kernel
knows it), restored like any other. Its memory still says it is the origin, so
its TAP stays off the bridge while it learns otherwise: the engine appends an
identity block to the config drive and grows the disk over it
(``block_resize``), the guest kernel sends a resize uevent, and the agent reads
the block and takes the new identity -- clock, RNG reseed, hostname, eth0
MAC/address/route, token (see :mod:`kiln.guest.reidentify`) -- and says so on
the console. Then the TAP joins the bridge and the engine waits for the agent
at the new address, with the new token, as after any create.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from kiln.guest.config import FORK_READY_LINE, identity_block

from ..base import SandboxSpec
from ..boots import BootReason, LastBoot
from ..errors import EngineError, InvalidSpec, InvalidState, SandboxCrashed
from ..guard import Admission
from ..states import CREATED
from ..undo import Undo
from . import disks, machine, process, snapshot, templates
from .argv import Drive
from .clock import set_clock
from .config import QemuConfig
from .hostnet import HostNet
from .layout import Paths, Record, guest_config
from .machine import VM, Phases
from .thermal import ThermalControl

log = logging.getLogger(__name__)

#: Bound on the clone taking its identity after the restore (normally < 1 s).
_IDENTITY_TIMEOUT: Final = 30.0
_IDENTITY_POLL: Final = 0.01
_SEED_BYTES: Final = 64
#: What of the clone's guest config its identity block carries (kiln.guest.reidentify).
_IDENTITY_KEYS: Final = ("sandbox_id", "hostname", "token", "dns", "network")

#: Fills a new clone's directory with the captured files; the meta that restores them.
Fill = Callable[[VM], Awaitable[snapshot.SnapshotMeta]]


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
                vm, admission, identity = await self._prepare(origin, spec, undo)
                phases.mark("net")
                vm.meta = await fill(vm)
                await asyncio.to_thread(snapshot.save_meta, vm.paths.snapshot_meta, vm.meta)
                phases.mark("copy")
                await admission.wait()
                undo.push("stop QEMU", lambda: machine.kill(vm))
                await self.detach(vm.record.tap)
                await self._thermal.restore(vm, make_tap=False)
                phases.mark("restore")
                await self.announce(vm, identity)
                await self.wait_identity(vm)
                await self.attach(vm.record.tap)
                phases.mark("identity")
                # The identity block's clock is some 0.1 s old by now: the first
                # request sets it exactly (and reseeds again).
                await machine.wait_agent(
                    vm,
                    self.config,
                    min(self.config.boot_timeout, _IDENTITY_TIMEOUT),
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
        log.info("sandbox %s made (%s): %s", sid, what, vm.phases)
        return vm

    async def _prepare(
        self, origin: Origin, spec: SandboxSpec, undo: Undo
    ) -> tuple[VM, Admission, dict[str, Any]]:
        """Address, TAP, directory, config drive and record of the clone."""
        sid = spec.sandbox_id
        net = self._net
        ip = net.allocate_ip(sid)
        undo.push("release IP", lambda: net.release_ip(ip))
        tap = await net.create_tap(sid)
        undo.push("delete TAP", lambda: net.delete_tap(tap))
        mac = net.network.mac_for(sid)
        await net.pin_neighbour(ip, mac)
        admission = net.guard.admit_soon(spec, ip, port=tap, mac=mac)
        undo.push("remove the firewall rules", admission.undo)
        root = self.config.sandboxes_dir / sid
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            raise InvalidState(
                f"{root} is left over from an earlier run; destroy {sid!r} first"
            ) from None
        undo.push("remove directory", lambda: asyncio.to_thread(disks.remove_tree, root))
        paths = Paths(root)
        src = origin.record
        drives = []
        for i, drive in enumerate(src.drives):
            if i == 0:
                name = Path(drive.path).name
                drives.append(dataclasses.replace(drive, path=str(root / name)))
            elif i == 1:
                drives.append(dataclasses.replace(drive, path=str(paths.config_drive)))
            else:  # a template's spare slot (no volumes: see check)
                slot = paths.slot(i - 2)
                await asyncio.to_thread(templates.write_slot_placeholder, slot)
                drives.append(Drive(str(slot)))
        record = Record(
            spec=spec,
            dir=str(root),
            token=secrets.token_hex(16),
            ip=ip,
            tap=tap,
            mac=mac,
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
        await disks.make_config_drive(paths.config_drive, config, origin.drive_size)
        await asyncio.to_thread(snapshot.write_json_atomic, paths.record, record.to_json())
        vm = VM(
            record=record,
            paths=paths,
            client=machine.client_for(record, self.config),
            state=CREATED.next,
            meta=snapshot.SnapshotMeta(),
        )
        identity: dict[str, Any] = {k: config[k] for k in _IDENTITY_KEYS if k in config}
        return vm, admission, identity

    # ------------------------------------------------------------------ identity

    async def announce(self, vm: VM, identity: dict[str, Any]) -> None:
        """Append the identity block to the running clone's config drive and grow the
        disk over it: the guest's resize uevent sets it going."""
        identity = {
            **identity,
            "clock_ns": time.time_ns(),
            "seed": base64.b64encode(secrets.token_bytes(_SEED_BYTES)).decode(),
        }
        block = identity_block(identity)
        size = await asyncio.to_thread(_append, vm.paths.config_drive, block)
        await machine.qmp(vm, "block_resize", {"device": "disk1", "size": size})

    async def wait_identity(self, vm: VM) -> None:
        line = f"{FORK_READY_LINE} {vm.sandbox_id},".encode()
        deadline = time.monotonic() + _IDENTITY_TIMEOUT
        while True:
            with contextlib.suppress(FileNotFoundError):
                if line in await asyncio.to_thread(vm.paths.console_log.read_bytes):
                    return
            if not process.pid_alive(vm.pid, vm.paths.marker):
                raise SandboxCrashed(
                    f"the clone {vm.sandbox_id} died while taking its identity:"
                    f" {machine.console_tail(vm)}"
                )
            if time.monotonic() > deadline:
                raise EngineError(
                    f"the clone {vm.sandbox_id} did not take its identity within"
                    f" {_IDENTITY_TIMEOUT:.0f} s: {machine.console_tail(vm)}"
                )
            await asyncio.sleep(_IDENTITY_POLL)

    async def detach(self, tap: str) -> None:
        await self._ip_link(tap, "nomaster")

    async def attach(self, tap: str) -> None:
        await self._ip_link(tap, "master", self.config.network.bridge)

    async def _ip_link(self, tap: str, *args: str) -> None:
        ns = self.config.network.netns
        await disks.run_tool(["ip", *(["-n", ns] if ns else []), "link", "set", tap, *args])


def _append(path: Path, block: bytes) -> int:
    """Blocking: ``block`` at the end of ``path``; the new size."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        offset = os.lseek(fd, 0, os.SEEK_END)
        os.pwrite(fd, block, offset)
        return offset + len(block)
    finally:
        os.close(fd)
