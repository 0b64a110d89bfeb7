"""Creating a sandbox: check the spec, take an address and a TAP, make the
directory, disks and config drive, then boot QEMU -- or restore the template
of the sandbox's shape, built here the first time (see :mod:`.templates`) --
until the agent answers. A failure undoes every step taken (:class:`Undo`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from kiln.faults import crash_point
from kiln.images import Image, kernel_cmdline_defaults

from ..base import SandboxSpec
from ..boots import BootReason, LastBoot
from ..errors import EngineError, InvalidSpec, InvalidState
from ..guard import Admission
from ..states import CREATED
from ..undo import Undo
from . import disks, machine, process, snapshot, templates
from .accel import Accel
from .argv import Drive
from .config import QemuConfig
from .host import Host
from .hostnet import HostNet
from .layout import Paths, Record, guest_config
from .machine import ENGINE_NAME, VM, Phases
from .thermal import ThermalControl

log = logging.getLogger(__name__)

#: Bound on a sandbox restored from a template configuring itself (normally < 1 s).
_CLONE_TIMEOUT: Final = 30.0
#: Random bytes for the guest RNG on the config drive.
_SEED_BYTES: Final = 64
#: The address of a template, which never configures its network.
_NO_IP: Final = "0.0.0.0"


def volume_path(config: QemuConfig, name: str) -> Path:
    return config.effective_volumes_dir / f"{name}.ext4"


class Provisioner:
    """Creates sandboxes; ``vms`` (the engine's, read only here) is what exists."""

    def __init__(
        self,
        config: QemuConfig,
        host: Host,
        net: HostNet,
        thermal: ThermalControl,
        vms: Mapping[str, VM],
    ) -> None:
        self.config = config
        self._host = host
        self._net = net
        self._thermal = thermal
        self._vms = vms
        self._creating: set[str] = set()
        self._template_locks: dict[str, asyncio.Lock] = {}

    @contextlib.contextmanager
    def reserving(self, spec: SandboxSpec) -> Iterator[None]:
        """Check ``spec`` and hold its id while a create made elsewhere (the warm pool's
        claim) is under way, as :meth:`create` does for its own."""
        self._check_spec(spec)
        self._creating.add(spec.sandbox_id)
        try:
            yield
        finally:
            self._creating.discard(spec.sandbox_id)

    def building_templates(self) -> bool:
        return any(lock.locked() for lock in self._template_locks.values())

    def _check_spec(self, spec: SandboxSpec) -> None:
        spec.validate()
        if spec.engine not in (None, ENGINE_NAME):
            raise InvalidSpec(f"the QEMU engine cannot run a {spec.engine} sandbox")
        if spec.sandbox_id in self._vms or spec.sandbox_id in self._creating:
            raise InvalidState(f"sandbox {spec.sandbox_id!r} already exists")
        in_use = {
            name: vm.sandbox_id
            for vm in self._vms.values()
            if not vm.destroyed
            for name in vm.record.volume_paths
        }
        for vol in spec.volumes:
            path = volume_path(self.config, vol.name)
            if vol.size_mb is None and not path.exists():
                raise InvalidSpec(f"volume {vol.name!r} does not exist")
            if vol.size_mb is not None and path.exists():
                raise InvalidSpec(f"volume {vol.name!r} already exists")
            if vol.name in in_use:
                raise InvalidState(f"volume {vol.name!r} is attached to {in_use[vol.name]}")
        if len({v.name for v in spec.volumes}) != len(spec.volumes):
            raise InvalidSpec("a volume is listed twice")

    async def create(self, spec: SandboxSpec) -> VM:
        """The sandbox, hot and answering; the caller adds it to ``vms``."""
        self._check_spec(spec)
        image = await self._host.image(spec.image)
        await self._host.ensure_ready(image)
        self._check_spec(spec)  # again: the awaits above let others in
        assert self._host.accel is not None
        accel = self._host.accel.accel
        sid = spec.sandbox_id
        self._creating.add(sid)
        try:
            template = await self._template_for(spec, image, accel)
            try:
                vm = await self._create_vm(spec, image, accel, template)
            except (InvalidState, InvalidSpec):
                raise
            except EngineError as exc:
                if template is None:
                    raise
                # The template may be what is broken: boot this one, rebuild it next time.
                log.warning(
                    "creating %s from template %s failed (%s); booting it instead",
                    sid,
                    template.key[:12],
                    exc,
                )
                await asyncio.to_thread(disks.remove_tree, template.paths.root)
                vm = await self._create_vm(spec, image, accel, None)
        finally:
            self._creating.discard(sid)
        log.debug("sandbox %s created: %s", sid, vm.phases)
        crash_point("qemu.create.ready")
        return vm

    async def prepare(self, spec: SandboxSpec) -> None:
        """Image, network and the template of ``spec``'s shape, so that the first
        create of that shape is as fast as the next ones."""
        spec.validate()
        image = await self._host.image(spec.image)
        await self._host.ensure_ready(image)
        assert self._host.accel is not None
        await self._template_for(spec, image, self._host.accel.accel)

    async def _create_vm(
        self, spec: SandboxSpec, image: Image, accel: Accel, template: templates.Template | None
    ) -> VM:
        """Disks, then QEMU (booted, or restored from ``template``), until the agent answers."""
        undo = Undo()
        phases = Phases()
        try:
            with machine.os_errors(f"creating sandbox {spec.sandbox_id}"):
                vm, admission = await self._build(spec, image, accel, undo, template)
                phases.mark("disks")
                await admission.wait()  # before the guest runs anything
                phases.mark("rules")
                undo.push("stop QEMU", lambda: machine.kill(vm))
                if template is None:
                    await machine.boot(vm, self.config, self._host.tsc_khz, incoming=False)
                    crash_point("qemu.create.qemu_started")
                    phases.mark("qemu")
                    await machine.wait_agent(vm, self.config, self.config.boot_timeout)
                    phases.mark("boot+agent")
                else:
                    await self._thermal.restore(vm)
                    crash_point("qemu.create.qemu_started")
                    await self._announce_volume_sizes(vm)
                    phases.mark("restore")
                    await machine.wait_agent(
                        vm, self.config, min(self.config.boot_timeout, _CLONE_TIMEOUT)
                    )
                    phases.mark("configure+agent")
                    # The drive carried the host's time as of a moment ago: make it exact.
                    await self._thermal.set_clock(vm)
                    phases.mark("clock")
        except BaseException:
            await undo.run()
            raise
        vm.phases = phases.done()
        vm.last_boot = LastBoot.now(BootReason.CREATED)
        return vm

    async def _announce_volume_sizes(self, vm: VM) -> None:
        """Tell a template-restored guest its volumes' sizes: the slots held tiny
        placeholders when the template booted. A ``block_resize`` to the current
        size changes nothing on disk but sends the guest a capacity change."""
        for i, vol in enumerate(vm.record.spec.volumes):
            size = await asyncio.to_thread(os.path.getsize, vm.record.volume_paths[vol.name])
            await machine.qmp(vm, "block_resize", {"device": f"disk{2 + i}", "size": size})

    async def write_config_drive(
        self,
        record: Record,
        dest: Path,
        devices: list[tuple[str, str, int]] | None = None,
        *,
        sized: bool = True,
    ) -> None:
        """The sandbox's config drive at ``dest`` (``sized``: of a template's drive size)."""
        guest_net = dict(self._net.network.guest_network(record.ip, record.net_owner))
        config = guest_config(record, guest_net, devices or [], self.config.guest_user)
        config["aslr"] = self._guest_aslr(Accel(record.accel))
        # A guest restored from a template has the template's clock and RNG state.
        config["clock_ns"] = time.time_ns()
        config["seed"] = base64.b64encode(secrets.token_bytes(_SEED_BYTES)).decode()
        drive_size = templates.DRIVE_SIZE if sized else None
        await disks.make_config_drive(dest, config, drive_size)

    def _guest_aslr(self, accel: Accel) -> bool:
        if self.config.guest_aslr == "auto":
            return accel is Accel.KVM
        return self.config.guest_aslr == "on"

    def _rootfs_format(self) -> str:
        return "qcow2" if self.config.disk_mode == "qcow2" else "raw"

    async def _build(
        self,
        spec: SandboxSpec,
        image: Image,
        accel: Accel,
        undo: Undo,
        template: templates.Template | None,
    ) -> tuple[VM, Admission]:
        """Allocate the IP and TAP, make the directory, disks and RAM file; from
        ``template``, copy its disk and RAM and leave a cold snapshot to restore.
        The firewall rules are still being written: wait for the admission."""
        sid = spec.sandbox_id
        cfg = self.config
        net = self._net
        ip = net.allocate_ip(sid)
        undo.push("release IP", lambda: net.release_ip(ip))
        tap = await net.create_tap(sid)
        undo.push("delete TAP", lambda: net.delete_tap(tap))
        await net.pin_neighbour(ip, net.network.mac_for(sid))
        # The rules are written while the disks are made; the guest waits for them.
        admission = net.guard.admit_soon(spec, ip, port=tap, mac=net.network.mac_for(sid))
        undo.push("remove the firewall rules", admission.undo)
        crash_point("qemu.create.net")
        root = cfg.sandboxes_dir / sid
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            raise InvalidState(
                f"{root} is left over from an earlier run; destroy {sid!r} first"
            ) from None
        undo.push("remove directory", lambda: asyncio.to_thread(disks.remove_tree, root))
        paths = Paths(root)

        kernel, initrd, base_rootfs = await asyncio.to_thread(self._host.pin_image, image)
        if template is None:
            rootfs_fmt = self._rootfs_format()
            rootfs = paths.rootfs(rootfs_fmt)
            await disks.make_rootfs(base_rootfs, rootfs, cfg.disk_mode)
        else:
            rootfs_fmt = template.rootfs_format
            rootfs = paths.rootfs(rootfs_fmt)
            await disks.copy_sparse(template.rootfs, rootfs)

        drives = [Drive(str(rootfs), rootfs_fmt), Drive(str(paths.config_drive))]
        volume_paths: dict[str, str] = {}
        created: list[str] = []
        devices: list[tuple[str, str, int]] = []
        for i, vol in enumerate(spec.volumes):
            path = volume_path(cfg, vol.name)
            if vol.size_mb is not None:
                await disks.make_volume(path, vol.size_mb, vol.name)
                created.append(vol.name)
                undo.push(f"remove new volume {vol.name}", _unlinker(path))
                crash_point("qemu.create.volume_file")
            volume_paths[vol.name] = str(path)
            drives.append(Drive(str(path)))
            devices.append((f"/dev/vd{chr(ord('c') + i)}", vol.mount, path.stat().st_size))
        if template is not None:
            # The template's disk slots the spec leaves unused keep a placeholder.
            for slot in range(len(spec.volumes), templates.VOLUME_SLOTS):
                placeholder = paths.slot(slot)
                await asyncio.to_thread(templates.write_slot_placeholder, placeholder)
                drives.append(Drive(str(placeholder)))

        record = Record(
            spec=spec,
            dir=str(root),
            token=secrets.token_hex(16),
            ip=ip,
            tap=tap,
            mac=net.network.mac_for(sid),
            accel=str(accel),
            kernel=str(kernel),
            initrd=str(initrd),
            image_digest=image.digest,
            drives=tuple(drives),
            volume_paths=volume_paths,
            created_volumes=tuple(created),
            created_at=time.time(),
        )
        await self.write_config_drive(
            record, paths.config_drive, devices, sized=template is not None
        )

        if template is None:
            meta = await asyncio.to_thread(_write_initial_files, paths, record)
        else:
            shared = cfg.shared_template_ram
            if not shared:
                await disks.copy_sparse(template.paths.ram, paths.ram)
            meta = await asyncio.to_thread(_write_clone_files, paths, record, template, shared)
        crash_point("qemu.create.disks")
        # Booted, or restored from the template's snapshot: either way, the state
        # its create leads to (nobody sees it before the create returns).
        vm = VM(
            record=record,
            paths=paths,
            client=machine.client_for(record, cfg),
            state=CREATED.next,
            meta=meta,
        )
        return vm, admission

    # ------------------------------------------------------------------ templates

    def _template_shape(self, image: Image, spec: SandboxSpec, accel: Accel) -> dict[str, Any]:
        cfg = self.config
        return {
            "image": image.digest,
            "cpus": spec.cpus,
            "memory_mb": spec.memory_mb,
            "accel": str(accel),
            "disk_mode": cfg.disk_mode,
            "qemu": templates.qemu_identity(shutil.which(cfg.qemu_binary) or cfg.qemu_binary),
            "tsc_khz": self._host.tsc_khz,
            "tb_size_mb": cfg.tb_size_mb,
            "kernel_args": list(kernel_cmdline_defaults(cpu_khz=0)),
            "volume_slots": templates.VOLUME_SLOTS,
        }

    async def _template_for(
        self, spec: SandboxSpec, image: Image, accel: Accel
    ) -> templates.Template | None:
        """The template to restore ``spec`` from (built now if missing); None: boot it."""
        if (
            not self.config.templates
            or len(spec.volumes) > templates.VOLUME_SLOTS
            or not templates.config_fits(spec)
        ):
            return None
        key = templates.template_key(self._template_shape(image, spec, accel))
        lock = self._template_locks.setdefault(key, asyncio.Lock())
        async with lock:
            tpl = await asyncio.to_thread(templates.load, self.config.templates_dir, key)
            if tpl is not None:
                return tpl
            try:
                return await self._build_template(key, spec, image, accel)
            except (InvalidState, InvalidSpec):
                raise
            except EngineError as exc:
                # Booting may still work (and will say what is wrong if it does not).
                log.warning("cannot build template %s: %s; booting instead", key[:12], exc)
                return None

    async def _build_template(
        self, key: str, spec: SandboxSpec, image: Image, accel: Accel
    ) -> templates.Template:
        """Boot the shape with a placeholder config drive and stop it where it waits."""
        started = time.perf_counter()
        root = templates.template_dir(self.config.templates_dir, key)
        tid = f"template-{key[:12]}"
        log.info(
            "building template %s (%s, %d vCPU, %d MB)", tid, image.tier, spec.cpus, spec.memory_mb
        )
        net = self._net
        undo = Undo()
        try:
            with machine.os_errors(f"building template {tid}"):
                clones = set(process.find_processes(f"{self.config.sandboxes_dir}/"))
                for pid in process.find_processes(f"{root}/"):  # a build that crashed
                    if pid not in clones:  # (clones map the old template's RAM: keep them)
                        await process.terminate(pid, f"{root}/")
                await asyncio.to_thread(disks.remove_tree, root)  # unfinished or stale
                root.mkdir(parents=True, mode=0o700)
                undo.push("remove the template", lambda: asyncio.to_thread(disks.remove_tree, root))
                paths = Paths(root)
                kernel, initrd, base_rootfs = await asyncio.to_thread(self._host.pin_image, image)
                fmt = await disks.make_rootfs(
                    base_rootfs, paths.rootfs(self._rootfs_format()), self.config.disk_mode
                )
                await asyncio.to_thread(templates.write_placeholder_drive, paths.config_drive)
                slots = [paths.slot(i) for i in range(templates.VOLUME_SLOTS)]
                for slot in slots:
                    await asyncio.to_thread(templates.write_slot_placeholder, slot)
                tap = await net.create_tap(tid)
                undo.push("delete the template's TAP", lambda: net.delete_tap(tap))
                record = Record(
                    spec=SandboxSpec(
                        sandbox_id=tid,
                        name=tid,
                        cpus=spec.cpus,
                        memory_mb=spec.memory_mb,
                        image=spec.image,
                    ),
                    dir=str(root),
                    token="",
                    ip=_NO_IP,
                    tap=tap,
                    mac=net.network.mac_for(tid),
                    accel=str(accel),
                    kernel=str(kernel),
                    initrd=str(initrd),
                    image_digest=image.digest,
                    drives=(
                        Drive(str(paths.rootfs(fmt)), fmt),
                        Drive(str(paths.config_drive)),
                        *(Drive(str(slot)) for slot in slots),
                    ),
                    created_at=time.time(),
                )
                meta = await asyncio.to_thread(_write_initial_files, paths, record)
                vm = VM(
                    record=record,
                    paths=paths,
                    client=machine.client_for(record, self.config),
                    state=CREATED.next,
                    meta=meta,
                )
                await machine.boot(vm, self.config, self._host.tsc_khz, incoming=False)
                undo.push("stop the template's QEMU", lambda: machine.kill(vm))
                await templates.wait_ready(
                    paths.console_log,
                    lambda: process.pid_alive(vm.pid, paths.marker),
                    self.config.boot_timeout,
                    lambda: machine.console_tail(vm),
                )
                await self._thermal.snapshot(vm)
                await net.delete_tap(tap)
                elapsed = (time.perf_counter() - started) * 1000
                shape = {"tier": image.tier, "cpus": spec.cpus, "memory_mb": spec.memory_mb}
                tpl = await asyncio.to_thread(templates.finish, paths, key, fmt, elapsed, shape)
        except BaseException:
            await undo.run()
            raise
        log.info("template %s ready in %.1f s", tid, elapsed / 1000)
        for old in await asyncio.to_thread(templates.superseded, self.config.templates_dir, tpl):
            log.info("removing superseded template %s", old.name)
            await asyncio.to_thread(disks.remove_tree, old)
        return tpl


def _write_initial_files(paths: Paths, record: Record) -> snapshot.SnapshotMeta:
    """Blocking: the empty RAM file, snapshot.json (no snapshot yet), sandbox.json."""
    meta = snapshot.SnapshotMeta()
    meta.ram_inode = snapshot.create_ram_file(paths.ram, record.spec.memory_mb << 20)
    snapshot.save_meta(paths.snapshot_meta, meta)
    snapshot.write_json_atomic(paths.record, record.to_json())
    return meta


def _write_clone_files(
    paths: Paths, record: Record, template: templates.Template, shared: bool
) -> snapshot.SnapshotMeta:
    """Blocking: the template's device state, a snapshot.json vouching for it (its
    RAM is the template's, mapped copy-on-write when ``shared``, else the copy made
    already), sandbox.json: a cold sandbox ready to restore."""
    shutil.copyfile(template.paths.state, paths.state)
    if shared:
        meta = snapshot.SnapshotMeta(valid=True, ram_template=str(template.paths.ram))
    else:
        meta = snapshot.SnapshotMeta(valid=True, ram_inode=snapshot.ram_inode(paths.ram))
    snapshot.save_meta(paths.snapshot_meta, meta)
    snapshot.write_json_atomic(paths.record, record.to_json())
    return meta


def _unlinker(path: Path) -> Callable[[], Awaitable[None]]:
    async def unlink() -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)

    return unlink
