"""Fork: a new sandbox whose disk, memory and processes are a copy of a running one's.

The copy is a snapshot the source never notices beyond a brief pause:

* **hot source** (a warm one, or a cold one without a usable snapshot, is made hot
  first): QMP ``stop``; migrate with ``x-ignore-shared`` into the clone's
  ``state.bin`` (device state only, as in :mod:`.snapshot`: the RAM lives in the
  ``share=on`` file, which a completed migration leaves consistent with the
  disks, inactivated and flushed); sparse/reflink copies of the RAM file and root
  disk; ``cont`` (QEMU re-activates the disks) and the source's clock is set
  again. :attr:`Forker.last_pause_ms` is how long its vCPUs stood still.
* **cold source with a valid snapshot**: the same three files are copied; the
  source is not touched.

The clone is then an ordinary cold sandbox with a valid snapshot and its own
address, MAC, TAP, token and config drive (of the source drive's size: the
guest kernel knows it), restored like any other. Its memory still says it is the
source, so its TAP stays off the bridge while it learns otherwise: the engine
appends an identity block to the config drive and grows the disk over it
(``block_resize``), the guest kernel sends a resize uevent, and the agent reads
the block and takes the new identity -- clock, RNG reseed, hostname, eth0
MAC/address/route, token (see :mod:`kiln.guest.reidentify`) -- and says so on
the console. Then the TAP joins the bridge and the engine waits for the agent
at the new address, with the new token, as after any create.

A sandbox with volumes cannot be forked: a volume is in one sandbox at a time.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from kiln.guest.config import FORK_READY_LINE, identity_block

from ..base import SandboxSpec, Thermal
from ..boots import BootReason, LastBoot
from ..errors import EngineError, InvalidSpec, InvalidState, SandboxCrashed, SandboxNotFound
from ..guard import Admission
from ..states import CREATED, Op
from ..undo import Undo
from . import disks, machine, process, snapshot, templates
from .argv import Drive
from .clock import set_clock
from .config import QemuConfig
from .hostnet import HostNet
from .layout import Paths, Record, guest_config
from .machine import VM, Phases
from .thermal import MAX_BANDWIDTH, ThermalControl

log = logging.getLogger(__name__)

#: Bound on the clone taking its identity after the restore (normally < 1 s).
_IDENTITY_TIMEOUT: Final = 30.0
_IDENTITY_POLL: Final = 0.01
_SEED_BYTES: Final = 64
_SNAPSHOT_FD: Final = "kiln-fork"
#: How often a fork makes a source hot and looks again (it may cool meanwhile).
_ATTEMPTS: Final = 3
#: What of the clone's guest config its identity block carries (kiln.guest.reidentify).
_IDENTITY_KEYS: Final = ("sandbox_id", "hostname", "token", "dns", "network")


class Forker:
    """Forks sandboxes of ``vms`` (the engine's, read only here)."""

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
        self._forking: set[str] = set()
        #: Milliseconds the last hot source stood still (None: it was cold).
        self.last_pause_ms: float | None = None

    async def fork(self, source: VM, spec: SandboxSpec) -> VM:
        """The clone, hot and answering as itself; the caller adds it to ``vms``."""
        self._check(source, spec)
        sid = spec.sandbox_id
        self._forking.add(sid)
        undo = Undo()
        phases = Phases()
        try:
            with machine.os_errors(f"forking {source.sandbox_id} into {sid}"):
                vm, admission, identity = await self._prepare(source, spec, undo)
                phases.mark("net")
                for _ in range(_ATTEMPTS):
                    if await self._copy(source, vm):
                        break
                    await self._thermal.transition(source, Op.ENSURE_HOT)
                else:
                    raise InvalidState(f"sandbox {source.sandbox_id} kept changing state")
                phases.mark("copy")
                await admission.wait()
                undo.push("stop QEMU", lambda: machine.kill(vm))
                await self._detach(vm.record.tap)
                await self._thermal.restore(vm, make_tap=False)
                phases.mark("restore")
                await self._announce(vm, identity)
                await self._wait_identity(vm)
                await self._attach(vm.record.tap)
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
            self._forking.discard(sid)
        vm.phases = phases.done()
        vm.last_boot = LastBoot.now(BootReason.CREATED)
        log.info("sandbox %s forked from %s: %s", sid, source.sandbox_id, vm.phases)
        return vm

    def _check(self, source: VM, spec: SandboxSpec) -> None:
        spec.validate()
        src = source.record.spec
        if source.destroyed:
            raise SandboxNotFound(f"sandbox {source.sandbox_id!r} was destroyed")
        if src.volumes:
            raise InvalidState(
                f"sandbox {source.sandbox_id} has volumes attached"
                f" ({', '.join(v.name for v in src.volumes)}): a volume cannot be in two"
                " sandboxes, so it cannot be forked"
            )
        if spec.volumes:
            raise InvalidSpec("a fork gets no volumes of its own")
        if (spec.cpus, spec.memory_mb, spec.image) != (src.cpus, src.memory_mb, src.image):
            raise InvalidSpec("a fork has its source's vCPUs, memory and image")
        if spec.sandbox_id in self._vms or spec.sandbox_id in self._forking:
            raise InvalidState(f"sandbox {spec.sandbox_id!r} already exists")

    async def _prepare(
        self, source: VM, spec: SandboxSpec, undo: Undo
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
        src = source.record
        drives = []
        for i, drive in enumerate(src.drives):
            if i == 0:
                name = Path(drive.path).name
                drives.append(dataclasses.replace(drive, path=str(root / name)))
            elif i == 1:
                drives.append(dataclasses.replace(drive, path=str(paths.config_drive)))
            else:  # a template's spare slot (no volumes: see _check)
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
        size = await asyncio.to_thread(os.path.getsize, src.drives[1].path)
        await disks.make_config_drive(paths.config_drive, config, size)
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

    # ------------------------------------------------------------------ copy

    async def _copy(self, source: VM, clone: VM) -> bool:
        """Copy the source's memory, device state and root disk into the clone's
        directory; False if the source is in no state to copy from (the caller
        makes it hot and asks again)."""
        async with source.lock:
            if source.destroyed:
                raise SandboxNotFound(f"sandbox {source.sandbox_id!r} was destroyed")
            machine.notice_death(source)
            state = source.state
            template = None
            if state.live and state.thermal is Thermal.HOT and not source.reboot:
                # A source still mapping its template's RAM copy-on-write hands the clone
                # the same mapping: the restore writes the streamed RAM over it (anonymous
                # pages: fast), and the clone's first stop settles it like the source's.
                template = source.meta.ram_template
                ram_in_state = await self._copy_running(source, clone)
            elif not state.live and source.meta.valid and not source.reboot:
                self.last_pause_ms = None
                ram_in_state = source.meta.ram_in_state
                await self._copy_files(source, clone, source.paths.state, copy_ram=True)
            else:
                return False
        meta = snapshot.SnapshotMeta(
            valid=True,
            ram_inode=snapshot.ram_inode(clone.paths.ram),
            ram_in_state=ram_in_state,
            ram_template=template,
        )
        clone.meta = meta
        await asyncio.to_thread(snapshot.save_meta, clone.paths.snapshot_meta, meta)
        return True

    async def _copy_running(self, source: VM, clone: VM) -> bool:
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
            state_tmp = clone.paths.state_tmp
            fd = os.open(state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                assert source.qmp is not None
                await source.qmp.send_fd(fd, _SNAPSHOT_FD)
            finally:
                os.close(fd)
            await machine.qmp(source, "migrate", {"uri": f"fd:{_SNAPSHOT_FD}"})
            await self._thermal.migration_done(source, "saving the device state for a fork")
            await self._copy_files(source, clone, state_tmp, copy_ram=base_ok)
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
            "fork of %s: the source was paused for %.1f ms", source.sandbox_id, self.last_pause_ms
        )
        return not base_ok

    async def _copy_files(self, source: VM, clone: VM, state: Path, *, copy_ram: bool) -> None:
        copies = [(Path(source.record.drives[0].path), Path(clone.record.drives[0].path))]
        if copy_ram:
            copies.append((source.paths.ram, clone.paths.ram))
        elif source.meta.ram_template is None:
            # The RAM is in the device state; the restore loads it into a fresh file.
            size = clone.record.spec.memory_mb << 20
            await asyncio.to_thread(snapshot.create_ram_file, clone.paths.ram, size)
        await asyncio.gather(*(disks.copy_sparse(a, b) for a, b in copies))
        if state != clone.paths.state_tmp:
            await disks.copy_sparse(state, clone.paths.state_tmp)
        await asyncio.to_thread(os.replace, clone.paths.state_tmp, clone.paths.state)

    # ------------------------------------------------------------------ identity

    async def _announce(self, vm: VM, identity: dict[str, Any]) -> None:
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

    async def _wait_identity(self, vm: VM) -> None:
        line = f"{FORK_READY_LINE} {vm.sandbox_id},".encode()
        deadline = time.monotonic() + _IDENTITY_TIMEOUT
        while True:
            with contextlib.suppress(FileNotFoundError):
                if line in await asyncio.to_thread(vm.paths.console_log.read_bytes):
                    return
            if not process.pid_alive(vm.pid, vm.paths.marker):
                raise SandboxCrashed(
                    f"the fork {vm.sandbox_id} died while taking its identity:"
                    f" {machine.console_tail(vm)}"
                )
            if time.monotonic() > deadline:
                raise EngineError(
                    f"the fork {vm.sandbox_id} did not take its identity within"
                    f" {_IDENTITY_TIMEOUT:.0f} s: {machine.console_tail(vm)}"
                )
            await asyncio.sleep(_IDENTITY_POLL)

    async def _detach(self, tap: str) -> None:
        await self._ip_link(tap, "nomaster")

    async def _attach(self, tap: str) -> None:
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
