"""The QEMU microVM engine.

One QEMU process per sandbox, started with ``-daemonize`` in its own session
(inside the configured network namespace), so it outlives a daemon crash and
:meth:`QemuEngine.import_state` can re-adopt it. Everything inside the guest
goes through the guest agent over TCP on the sandbox's TAP network.

States: every transition is planned by :mod:`kiln.engine.states` and only its
``next`` state is ever assigned (:meth:`QemuEngine._apply`). The actions, here:
hot ↔ warm is QMP ``stop``/``cont``; cold is a snapshot on disk and no process
(see :mod:`.snapshot` for how a stop works). Each sandbox has an asyncio lock
held only while its state is checked or changed (QMP calls, snapshot, restore)
-- never across an agent call. After every resume or restore the guest clock is
set through the agent.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kiln.agent_client import (
    CONTROL_PORT,
    FORWARD_PORT,
    AgentClient,
    AgentConnectError,
    AgentConnectionLost,
    AgentError,
    AgentTimeout,
    Endpoint,
    ForwardStream,
)
from kiln.images import Image, ImageError, UnknownTier, ensure_image, kernel_cmdline_defaults
from kiln.network import IPPool, Network, NetworkError, netns_exec_argv

from ..base import SandboxInfo, SandboxSpec, Thermal
from ..errors import (
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    InvalidSpec,
    InvalidState,
    SandboxCrashed,
    SandboxNotFound,
)
from ..ports import listening_ports
from ..states import ADOPTED, CREATED, Action, Found, Op, State, Transition, plan
from . import disks, process, snapshot, templates
from .accel import Accel, AccelDecision, decide_accel, host_facts, probe_boot
from .argv import Drive, NetDevice, VMConfig, build_argv, build_probe_argv, host_tsc_khz
from .clock import set_clock
from .config import QemuConfig
from .dial import agent_dialer
from .layout import Paths, Record, guest_config
from .qmp import QMP

log = logging.getLogger(__name__)

ENGINE_NAME: Final = "qemu"
STATE_VERSION: Final = 1
_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SNAPSHOT_FD: Final = "kiln-snapshot"
_MIGRATE_POLL: Final = 0.002
_BOOT_POLL: Final = 0.02
_BOOT_CONNECT_TIMEOUT: Final = 0.1
#: Bound on a sandbox restored from a template configuring itself (normally < 1 s).
_CLONE_TIMEOUT: Final = 30.0
#: Random bytes for the guest RNG on the config drive.
_SEED_BYTES: Final = 64
#: The address of a template, which never configures its network.
_NO_IP: Final = "0.0.0.0"
#: Console and QEMU logs are rotated (one old generation kept) past this size.
_LOG_LIMIT: Final = 8 << 20
#: QEMU's default migration bandwidth cap (128 MiB/s) applies even to a stopped VM;
#: it only matters for the full fallback, where RAM goes into the stream.
_MAX_BANDWIDTH: Final = 1 << 40
#: QMP runstates of a QEMU whose vCPUs are stopped but which can ``cont``.
_PAUSED_RUNSTATES: Final = frozenset({"paused", "postmigrate", "finish-migrate", "prelaunch"})


@dataclass(eq=False)
class _VM:
    record: Record
    paths: Paths
    client: AgentClient
    state: State
    meta: snapshot.SnapshotMeta
    pid: int | None = None
    qmp: QMP | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    destroyed: bool = False
    #: The CLOCK_SET after the last resume/restore; ensure_hot waits for it.
    clock_task: asyncio.Task[None] | None = None
    #: Milliseconds per phase of the last create or restore (for benchmarks, logs).
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def sandbox_id(self) -> str:
        return self.record.spec.sandbox_id


class _Phases:
    """Wall-clock milliseconds of consecutive phases."""

    def __init__(self) -> None:
        self._last = self._start = time.perf_counter()
        self._out: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self._out[name] = round((now - self._last) * 1000, 2)
        self._last = now

    def done(self) -> dict[str, float]:
        self._out["total"] = round((time.perf_counter() - self._start) * 1000, 2)
        return self._out


class _Undo:
    """Cleanup steps of a half-done create, run in reverse order on failure."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def push(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        self._steps.append((what, step))

    async def run(self) -> None:
        for what, step in reversed(self._steps):
            try:
                await step()
            except Exception:
                log.exception("cleanup after a failed create: %s failed", what)
        self._steps.clear()


class QemuEngine:
    """Sandboxes as QEMU microVMs. Construct, then use; no I/O in the constructor.

    Engine-wide setup (network bridge, accelerator choice, image pinning) happens
    lazily on the first :meth:`create` or :meth:`import_state`.
    """

    name = ENGINE_NAME

    def __init__(self, config: QemuConfig | None = None) -> None:
        self.config = config if config is not None else QemuConfig()
        self._network = Network(self.config.network)
        self._pool = IPPool(self.config.network.subnet)
        self._vms: dict[str, _VM] = {}
        self._creating: set[str] = set()
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._images: dict[str, Image] = {}
        self._image_lock = asyncio.Lock()
        self._accel: AccelDecision | None = None
        self._template_locks: dict[str, asyncio.Lock] = {}
        self._tsc_khz: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ engine setup

    @property
    def accel(self) -> AccelDecision | None:
        """The accelerator decision (None until the first create/import)."""
        return self._accel

    @property
    def network(self) -> Network:
        return self._network

    @property
    def pool(self) -> IPPool:
        return self._pool

    async def _ensure_ready(self, image: Image | None) -> None:
        if self._ready and (self._accel is not None and not self._accel.needs_probe):
            return
        async with self._ready_lock:
            if self._closed:
                raise EngineUnavailable("the QEMU engine is closed")
            if not self._ready:
                if shutil.which(self.config.qemu_binary) is None:
                    raise EngineUnavailable(f"{self.config.qemu_binary} is not installed")
                for d in (
                    self.config.sandboxes_dir,
                    self.config.bases_dir,
                    self.config.effective_volumes_dir,
                ):
                    d.mkdir(parents=True, exist_ok=True)
                try:
                    await asyncio.to_thread(self._network.setup)
                except NetworkError as exc:
                    raise EngineUnavailable(f"sandbox network setup failed: {exc}") from exc
                self._tsc_khz = host_tsc_khz()
                facts = await asyncio.to_thread(host_facts)
                self._accel = decide_accel(self.config.accel, facts)
                self._ready = True
            if self._accel is not None and self._accel.needs_probe and image is not None:
                ok, detail = await self._probe_kvm(image.kernel)
                facts = await asyncio.to_thread(host_facts)
                self._accel = decide_accel(self.config.accel, facts, probe_ok=ok)
                log.info("accelerator: %s (%s: %s)", self._accel.accel, self._accel.reason, detail)

    async def _probe_kvm(self, kernel: Path) -> tuple[bool, str]:
        probe_dir = self.config.data_dir / "accel-probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        console = probe_dir / "console.log"
        console.unlink(missing_ok=True)
        argv = build_probe_argv(self.config.qemu_binary, kernel, Accel.KVM, console, self._tsc_khz)
        return await probe_boot(argv, console)

    async def _image(self, tier: str) -> Image:
        async with self._image_lock:
            image = self._images.get(tier)
            if image is not None and image.kernel.exists():
                return image
            try:
                image = await asyncio.to_thread(ensure_image, tier, self.config.image_dir)
            except UnknownTier as exc:
                raise ImageNotFound(str(exc)) from exc
            except ImageError as exc:
                raise ImageNotFound(f"image {tier!r} is not available: {exc}") from exc
            self._images[tier] = image
            return image

    def _pin_image(self, image: Image) -> tuple[Path, Path, Path]:
        """Hard-link (or copy) the image files under data_dir/bases/<digest>.

        Root-disk overlays and cold snapshots refer to these paths, so a rebuilt or
        pruned image cache never pulls the floor from under a sandbox.
        """
        base = self.config.bases_dir / image.digest[:16]
        files = (
            (image.kernel, base / "vmlinux"),
            (image.initrd, base / "initramfs.cpio"),
            (image.rootfs, base / "rootfs.ext4"),
        )
        if all(dst.exists() for _, dst in files):
            return files[0][1], files[1][1], files[2][1]
        tmp = base.with_name(f".{base.name}.{secrets.token_hex(4)}")
        tmp.mkdir(parents=True)
        try:
            for src, dst in files:
                try:
                    os.link(src, tmp / dst.name)
                except OSError:  # another filesystem: a private read-only copy
                    shutil.copyfile(src, tmp / dst.name)
                    os.chmod(tmp / dst.name, 0o444)
            try:
                tmp.rename(base)
            except OSError:
                if not base.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return files[0][1], files[1][1], files[2][1]

    # ------------------------------------------------------------------ lookup, info

    def _get(self, sandbox_id: str) -> _VM:
        vm = self._vms.get(sandbox_id)
        if vm is None or vm.destroyed:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r} in the QEMU engine")
        return vm

    def _info(self, vm: _VM) -> SandboxInfo:
        spec = vm.record.spec
        return SandboxInfo(
            sandbox_id=spec.sandbox_id,
            name=spec.name,
            engine=ENGINE_NAME,
            image=spec.image,
            status=vm.state.status,
            thermal=vm.state.thermal,
            ip=vm.record.ip,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            keep_hot=spec.keep_hot,
            has_snapshot=vm.meta.valid,
        )

    def _notice_death(self, vm: _VM) -> bool:
        """Mark a sandbox whose QEMU vanished as crashed; True if it did."""
        if vm.state.live and not process.pid_alive(vm.pid, vm.paths.marker):
            log.warning("QEMU of sandbox %s (pid %s) is gone", vm.sandbox_id, vm.pid)
            # The crash's kill: the process is gone already, the QMP connection is
            # dropped by the next transition (this runs in lock-free observers too).
            vm.pid = None
            self._apply(vm, plan(Op.CRASH, vm.state, vm.sandbox_id))
            return True
        return False

    @staticmethod
    def _apply(vm: _VM, step: Transition) -> None:
        """Where a sandbox's state changes: to a planned transition's ``next``.

        (Its first state is :data:`CREATED` or :data:`ADOPTED`'s; a restore that
        fails before the guest ran puts back the state it started from.)"""
        vm.state = step.next

    def _observe(self, vm: _VM) -> None:
        """Death check for the lock-free observers (thermal, info, list).

        While a transition holds the lock, pid and thermal change in steps (a stop
        clears the pid before the sandbox is cold), so a check from outside would
        mistake a snapshot in progress for a crash; the transition notices a real
        death itself.
        """
        if not vm.lock.locked():
            self._notice_death(vm)

    def thermal(self, sandbox_id: str) -> Thermal:
        vm = self._get(sandbox_id)
        self._observe(vm)
        return vm.state.thermal

    def info(self, sandbox_id: str) -> SandboxInfo:
        vm = self._get(sandbox_id)
        self._observe(vm)
        return self._info(vm)

    def list(self) -> list[SandboxInfo]:
        out = []
        for vm in list(self._vms.values()):
            if not vm.destroyed:
                self._observe(vm)
                out.append(self._info(vm))
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

    # ------------------------------------------------------------------ create

    def _check_spec(self, spec: SandboxSpec) -> None:
        spec.validate()
        if not _ID_RE.match(spec.sandbox_id):
            raise InvalidSpec(
                f"invalid sandbox id {spec.sandbox_id!r} (letters, digits, '.', '_', '-')"
            )
        if spec.sandbox_id in self._vms or spec.sandbox_id in self._creating:
            raise InvalidState(f"sandbox {spec.sandbox_id!r} already exists")
        in_use = {
            name: vm.sandbox_id
            for vm in self._vms.values()
            if not vm.destroyed
            for name in vm.record.volume_paths
        }
        for vol in spec.volumes:
            path = self._volume_path(vol.name)
            if vol.size_mb is None and not path.exists():
                raise InvalidSpec(f"volume {vol.name!r} does not exist")
            if vol.size_mb is not None and path.exists():
                raise InvalidSpec(f"volume {vol.name!r} already exists")
            if vol.name in in_use:
                raise InvalidState(f"volume {vol.name!r} is attached to {in_use[vol.name]}")
        if len({v.name for v in spec.volumes}) != len(spec.volumes):
            raise InvalidSpec("a volume is listed twice")

    def _volume_path(self, name: str) -> Path:
        return self.config.effective_volumes_dir / f"{name}.ext4"

    def _client_for(self, record: Record, connect_timeout: float | None = None) -> AgentClient:
        ns = self.config.network.netns
        ip = record.ip
        timeout = connect_timeout or self.config.agent_timeout

        endpoint = Endpoint(
            agent_dialer(ns, ip, CONTROL_PORT, timeout),
            agent_dialer(ns, ip, FORWARD_PORT, timeout),
            f"agent of {record.spec.sandbox_id} at {ip}",
        )
        return AgentClient(
            endpoint,
            record.token,
            connect_timeout=timeout,
            auth_timeout=self.config.agent_timeout,
        )

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        self._check_spec(spec)
        image = await self._image(spec.image)
        await self._ensure_ready(image)
        self._check_spec(spec)  # again: the awaits above let others in
        assert self._accel is not None
        accel = self._accel.accel
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
        self._vms[sid] = vm
        log.debug("sandbox %s created: %s", sid, vm.phases)
        return self._info(vm)

    async def prepare(self, spec: SandboxSpec) -> None:
        """Image, network and the template of ``spec``'s shape, so that the first
        create of that shape is as fast as the next ones."""
        spec.validate()
        image = await self._image(spec.image)
        await self._ensure_ready(image)
        assert self._accel is not None
        await self._template_for(spec, image, self._accel.accel)

    async def _create_vm(
        self, spec: SandboxSpec, image: Image, accel: Accel, template: templates.Template | None
    ) -> _VM:
        """Disks, then QEMU (booted, or restored from ``template``), until the agent answers."""
        undo = _Undo()
        phases = _Phases()
        try:
            with _os_errors(f"creating sandbox {spec.sandbox_id}"):
                vm = await self._build(spec, image, accel, undo, template)
                phases.mark("disks")
                undo.push("stop QEMU", lambda: self._kill(vm))
                if template is None:
                    await self._boot(vm, incoming=False)
                    phases.mark("qemu")
                    await self._wait_agent(vm, self.config.boot_timeout)
                    phases.mark("boot+agent")
                else:
                    await self._restore(vm)
                    await self._announce_volume_sizes(vm)
                    phases.mark("restore")
                    await self._wait_agent(vm, min(self.config.boot_timeout, _CLONE_TIMEOUT))
                    phases.mark("configure+agent")
                    # The drive carried the host's time as of a moment ago: make it exact.
                    await self._set_clock(vm)
                    phases.mark("clock")
        except BaseException:
            await undo.run()
            raise
        vm.phases = phases.done()
        return vm

    async def _announce_volume_sizes(self, vm: _VM) -> None:
        """Tell a template-restored guest its volumes' sizes: the slots held tiny
        placeholders when the template booted. A ``block_resize`` to the current
        size changes nothing on disk but sends the guest a capacity change."""
        for i, vol in enumerate(vm.record.spec.volumes):
            size = await asyncio.to_thread(os.path.getsize, vm.record.volume_paths[vol.name])
            await self._qmp(vm, "block_resize", {"device": f"disk{2 + i}", "size": size})

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
            "tsc_khz": self._tsc_khz,
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
        undo = _Undo()
        try:
            with _os_errors(f"building template {tid}"):
                for pid in process.find_processes(f"{root}/"):  # a build that crashed
                    await process.terminate(pid, f"{root}/")
                await asyncio.to_thread(disks.remove_tree, root)  # unfinished or stale
                root.mkdir(parents=True, mode=0o700)
                undo.push("remove the template", lambda: asyncio.to_thread(disks.remove_tree, root))
                paths = Paths(root)
                kernel, initrd, base_rootfs = await asyncio.to_thread(self._pin_image, image)
                fmt = await disks.make_rootfs(
                    base_rootfs, paths.rootfs(self._rootfs_format()), self.config.disk_mode
                )
                await asyncio.to_thread(templates.write_placeholder_drive, paths.config_drive)
                slots = [paths.slot(i) for i in range(templates.VOLUME_SLOTS)]
                for slot in slots:
                    await asyncio.to_thread(templates.write_slot_placeholder, slot)
                tap = await self._create_tap(tid)
                undo.push("delete the template's TAP", lambda: self._delete_tap(tap))
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
                    mac=self._network.mac_for(tid),
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
                vm = _VM(
                    record=record,
                    paths=paths,
                    client=self._client_for(record),
                    state=CREATED.next,
                    meta=meta,
                )
                await self._boot(vm, incoming=False)
                undo.push("stop the template's QEMU", lambda: self._kill(vm))
                await templates.wait_ready(
                    paths.console_log,
                    lambda: process.pid_alive(vm.pid, paths.marker),
                    self.config.boot_timeout,
                    lambda: self._console_tail(vm),
                )
                await self._snapshot(vm)
                await self._delete_tap(tap)
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

    def _guest_aslr(self, accel: Accel) -> bool:
        if self.config.guest_aslr == "auto":
            return accel is Accel.KVM
        return self.config.guest_aslr == "on"

    def _rootfs_format(self) -> str:
        return "qcow2" if self.config.disk_mode == "qcow2" else "raw"

    async def _create_tap(self, sid: str) -> str:
        try:
            return await asyncio.to_thread(self._network.create_tap, sid)
        except NetworkError as exc:
            raise EngineError(f"cannot create the TAP of {sid}: {exc}") from exc

    async def _build(
        self,
        spec: SandboxSpec,
        image: Image,
        accel: Accel,
        undo: _Undo,
        template: templates.Template | None,
    ) -> _VM:
        """Allocate the IP and TAP, make the directory, disks and RAM file; from
        ``template``, copy its disk and RAM and leave a cold snapshot to restore."""
        sid = spec.sandbox_id
        cfg = self.config
        try:
            ip = self._pool.allocate(sid)
        except NetworkError as exc:
            raise EngineError(f"no guest address for {sid}: {exc}") from exc
        undo.push("release IP", lambda: self._release_ip(ip))
        tap = await self._create_tap(sid)
        undo.push("delete TAP", lambda: self._delete_tap(tap))
        await self._pin_neighbour(ip, self._network.mac_for(sid))
        root = cfg.sandboxes_dir / sid
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            raise InvalidState(
                f"{root} is left over from an earlier run; destroy {sid!r} first"
            ) from None
        undo.push("remove directory", lambda: asyncio.to_thread(disks.remove_tree, root))
        paths = Paths(root)

        kernel, initrd, base_rootfs = await asyncio.to_thread(self._pin_image, image)
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
            path = self._volume_path(vol.name)
            if vol.size_mb is not None:
                await disks.make_volume(path, vol.size_mb, vol.name)
                created.append(vol.name)
                undo.push(f"remove new volume {vol.name}", _unlinker(path))
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
            mac=self._network.mac_for(sid),
            accel=str(accel),
            kernel=str(kernel),
            initrd=str(initrd),
            image_digest=image.digest,
            drives=tuple(drives),
            volume_paths=volume_paths,
            created_volumes=tuple(created),
            created_at=time.time(),
        )
        net = dict(self._network.guest_network(ip, sid))
        config = guest_config(record, net, devices, cfg.guest_user)
        config["aslr"] = self._guest_aslr(accel)
        # A guest restored from a template has the template's clock and RNG state.
        config["clock_ns"] = time.time_ns()
        config["seed"] = base64.b64encode(secrets.token_bytes(_SEED_BYTES)).decode()
        drive_size = None if template is None else templates.DRIVE_SIZE
        await disks.make_config_drive(paths.config_drive, config, drive_size)

        if template is None:
            meta = await asyncio.to_thread(_write_initial_files, paths, record)
        else:
            await disks.copy_sparse(template.paths.ram, paths.ram)
            meta = await asyncio.to_thread(_write_clone_files, paths, record, template)
        # Booted, or restored from the template's snapshot: either way, the state
        # its create leads to (nobody sees it before the create returns).
        return _VM(
            record=record,
            paths=paths,
            client=self._client_for(record),
            state=CREATED.next,
            meta=meta,
        )

    def _vm_config(self, vm: _VM, *, incoming: bool) -> VMConfig:
        rec = vm.record
        spec = rec.spec
        return VMConfig(
            name=spec.sandbox_id,
            qemu=self.config.qemu_binary,
            kernel=rec.kernel,
            initrd=rec.initrd,
            accel=Accel(rec.accel),
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            console_log=str(vm.paths.console_log),
            qmp_socket=vm.paths.qmp_socket.name,  # relative to the sandbox directory
            ram_path=str(vm.paths.ram),
            drives=rec.drives,
            net=NetDevice(rec.tap, rec.mac),
            kernel_args=tuple(kernel_cmdline_defaults(cpu_khz=0)),
            tsc_khz=self._tsc_khz,
            tb_size_mb=self.config.tb_size_mb,
            pidfile=str(vm.paths.pidfile),
            incoming=incoming,
        )

    async def _boot(self, vm: _VM, *, incoming: bool) -> None:
        """Start QEMU (daemonized, in the netns) and connect QMP."""
        argv = build_argv(self._vm_config(vm, incoming=incoming))
        argv = netns_exec_argv(self.config.network.netns, argv)
        vm.paths.qmp_socket.unlink(missing_ok=True)
        for log_file in (vm.paths.console_log, vm.paths.qemu_log):
            _rotate(log_file)
        try:
            vm.pid = await process.launch(
                argv, cwd=vm.paths.root, log_path=vm.paths.qemu_log, pidfile=vm.paths.pidfile
            )
        except process.LaunchFailed:
            # A QEMU that got as far as daemonizing may still be around.
            for pid in process.find_processes(vm.paths.marker):
                await process.terminate(pid, vm.paths.marker)
            raise
        vm.qmp = QMP(vm.sandbox_id, vm.paths.qmp_socket, self.config.qmp_timeout)
        try:
            await vm.qmp.connect()
        except BaseException:
            await self._kill(vm)
            raise

    async def _wait_agent(self, vm: _VM, timeout: float) -> None:  # noqa: ASYNC109
        """Poll the agent until it answers; SandboxCrashed if QEMU dies meanwhile."""
        probe = self._client_for(vm.record, _BOOT_CONNECT_TIMEOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await probe.activity()
                return
            except (AgentConnectError, AgentConnectionLost, AgentTimeout) as exc:
                if not process.pid_alive(vm.pid, vm.paths.marker):
                    raise SandboxCrashed(
                        f"sandbox {vm.sandbox_id} died while booting: {self._console_tail(vm)}"
                    ) from exc
                if time.monotonic() > deadline:
                    raise SandboxCrashed(
                        f"the agent of {vm.sandbox_id} did not answer within "
                        f"{timeout:.0f} s: {self._console_tail(vm)}"
                    ) from exc
            except AgentError as exc:
                raise EngineError(f"the agent of {vm.sandbox_id} refused us: {exc}") from exc
            await asyncio.sleep(_BOOT_POLL)

    def _console_tail(self, vm: _VM, lines: int = 6) -> str:
        try:
            text = vm.paths.console_log.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no console output)"

    # ------------------------------------------------------------------ thermal

    async def pause(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.PAUSE)

    async def resume(self, sandbox_id: str) -> None:
        """warm → hot. Returns once the vCPUs run; the guest clock is set in the
        background, and :meth:`ensure_hot` / :meth:`agent` wait for that."""
        await self._transition(sandbox_id, Op.RESUME)

    async def ensure_hot(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.ENSURE_HOT)

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        # The cold step: the engine cannot tell the user's stop from the thermal
        # manager's, and never records "stopped" (the store does).
        vm = await self._transition(sandbox_id, Op.COOL)
        return self._info(vm)

    async def start(self, sandbox_id: str) -> SandboxInfo:
        vm = await self._transition(sandbox_id, Op.START)
        return self._info(vm)

    async def agent(self, sandbox_id: str) -> AgentClient:
        vm = await self._transition(sandbox_id, Op.ENSURE_HOT)
        return vm.client

    async def tunnel(self, sandbox_id: str, port: int) -> ForwardStream:
        """A raw byte stream to ``127.0.0.1:port`` in the sandbox (the agent's forward).

        Agent errors (``ForwardError`` when nothing listens) pass through unchanged.
        """
        client = await self.agent(sandbox_id)
        return await client.forward(port)

    async def listening_ports(self, sandbox_id: str) -> builtins.list[int]:
        return await listening_ports(await self.agent(sandbox_id))

    async def _transition(self, sandbox_id: str, op: Op) -> _VM:
        vm = self._get(sandbox_id)
        async with vm.lock:
            if vm.destroyed:
                raise SandboxNotFound(f"sandbox {sandbox_id!r} was destroyed")
            if self._notice_death(vm):
                await self._drop_qmp(vm)
            step = plan(op, vm.state, sandbox_id)
            action = step.action
            if action in (Action.PAUSE, Action.SNAPSHOT):
                await self._cancel_clock(vm)  # the next wake-up sets it again
            with _os_errors(f"{op} of sandbox {sandbox_id}"):
                match action:
                    case Action.NOTHING:
                        pass
                    case Action.PAUSE:
                        await self._qmp(vm, "stop")
                    case Action.RESUME:
                        await self._qmp(vm, "cont")
                    case Action.SNAPSHOT:
                        await self._snapshot(vm)
                    case Action.RESTORE:
                        await self._restore(vm)
                    case _:  # BOOT, SHUTDOWN, KILL: not planned for these ops with snapshots
                        raise AssertionError(f"{op} planned {action}")
            self._apply(vm, step)
            if action in (Action.RESUME, Action.RESTORE):
                # The guest's clock stood still: set it (and reseed its RNG) through the
                # agent -- outside the lock, as a task that ensure_hot/agent wait for.
                vm.clock_task = asyncio.create_task(
                    self._set_clock(vm), name=f"kiln-clock-{vm.sandbox_id}"
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

    async def _set_clock(self, vm: _VM) -> None:
        try:
            await set_clock(vm.client, timeout=self.config.agent_timeout)
        except AgentError as exc:
            log.warning("could not set the clock of %s: %s", vm.sandbox_id, exc)

    async def _cancel_clock(self, vm: _VM) -> None:
        task, vm.clock_task = vm.clock_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _qmp(
        self,
        vm: _VM,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """A QMP command; a dead or hung QEMU marks the sandbox crashed (lock held)."""
        if vm.qmp is None:
            raise await self._crashed(vm, f"no QMP connection to the QEMU of {vm.sandbox_id}")
        try:
            return await vm.qmp.execute(command, arguments, timeout=timeout)
        except SandboxCrashed as exc:
            raise await self._crashed(vm, str(exc)) from exc

    async def _crashed(self, vm: _VM, why: str) -> SandboxCrashed:
        log.warning("sandbox %s crashed: %s", vm.sandbox_id, why)
        await self._kill(vm)
        self._apply(vm, plan(Op.CRASH, vm.state, vm.sandbox_id))
        return SandboxCrashed(f"sandbox {vm.sandbox_id} crashed: {why}")

    async def _drop_qmp(self, vm: _VM) -> None:
        qmp, vm.qmp = vm.qmp, None
        if qmp is not None:
            await qmp.close()

    async def _kill(self, vm: _VM) -> None:
        """Make sure no QEMU of this sandbox runs (idempotent)."""
        await self._drop_qmp(vm)
        pid = vm.pid if vm.pid is not None else process.read_pid(vm.paths.pidfile)
        await process.terminate(pid, vm.paths.marker)
        vm.pid = None

    # ------------------------------------------------------------------ snapshot / restore

    async def _migration_done(self, vm: _VM, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.snapshot_timeout
        while True:
            status: dict[str, Any] = await self._qmp(vm, "query-migrate")
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

    async def _snapshot(self, vm: _VM) -> None:
        """hot/warm → cold: device state to state.bin, QEMU exits, RAM file synced."""
        p = vm.paths
        started = time.perf_counter()
        was_hot = vm.state.thermal is Thermal.HOT
        if was_hot:
            await self._qmp(vm, "stop")
        # The RAM file is the base of the snapshot; if it vanished or was replaced
        # while QEMU ran, fall back to a full snapshot with RAM in the stream.
        base_ok = vm.meta.ram_inode is not None and snapshot.ram_inode(p.ram) == vm.meta.ram_inode
        try:
            await self._qmp(
                vm,
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": base_ok}]},
            )
            await self._qmp(vm, "migrate-set-parameters", {"max-bandwidth": _MAX_BANDWIDTH})
            fd = os.open(p.state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                assert vm.qmp is not None
                await vm.qmp.send_fd(fd, _SNAPSHOT_FD)
            finally:
                os.close(fd)
            migrate_start = time.perf_counter()
            await self._qmp(vm, "migrate", {"uri": f"fd:{_SNAPSHOT_FD}"})
            await self._migration_done(vm, "saving the device state")
            migrate_ms = (time.perf_counter() - migrate_start) * 1000
        except SandboxCrashed:
            raise
        except BaseException:
            # Roll back to where we were: the guest keeps running as if nothing happened.
            if was_hot and vm.qmp is not None and vm.state.live:
                with contextlib.suppress(EngineError):
                    await self._qmp(vm, "cont")
            p.state_tmp.unlink(missing_ok=True)
            raise
        full = not (base_ok and vm.meta.ram_synced)
        try:
            assert vm.qmp is not None
            await vm.qmp.quit(timeout=self.config.qmp_timeout)
            vm.qmp = None
            if not await process.wait_gone(vm.pid or 0, p.marker, self.config.qmp_timeout):
                await process.terminate(vm.pid, p.marker)
            vm.pid = None
            stats = await asyncio.to_thread(self._make_durable, vm, base_ok)
        except BaseException:
            # QEMU is (being) gone but the snapshot is not durable: nothing to resume.
            await self._kill(vm)
            self._apply(vm, plan(Op.LOST, vm.state, vm.sandbox_id))
            raise
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
            ram_in_state=not base_ok,
        )
        meta.record(rec)
        meta.valid = True
        await asyncio.to_thread(snapshot.save_meta, p.snapshot_meta, meta)
        log.info(
            "sandbox %s cold: %s snapshot, %d B state, %s B RAM written, %.1f ms",
            vm.sandbox_id,
            rec.kind,
            rec.state_bytes,
            rec.ram_written_bytes,
            rec.total_ms,
        )

    def _make_durable(self, vm: _VM, base_ok: bool) -> snapshot.SyncStats:
        """Blocking: state.bin, RAM file and disks on stable storage; page cache freed."""
        p = vm.paths
        snapshot.fsync_path(p.state_tmp)
        os.replace(p.state_tmp, p.state)
        if base_ok:
            stats = snapshot.sync_ram_file(p.ram)
            vm.meta.ram_synced = True
        else:
            # RAM is in state.bin; the restore loads it into a fresh file.
            p.ram.unlink(missing_ok=True)
            vm.meta.ram_inode = snapshot.create_ram_file(p.ram, vm.record.spec.memory_mb << 20)
            vm.meta.ram_synced = False
            stats = snapshot.SyncStats(None, 0, 0.0)
        for drive in vm.record.drives:
            snapshot.fsync_path(Path(drive.path))
        snapshot.fsync_dir(p.root)
        return stats

    def _snapshot_usable(self, vm: _VM) -> str | None:
        """Why the snapshot cannot be restored, or None if it can."""
        p = vm.paths
        if not vm.meta.valid:
            return "no valid snapshot (it was never taken or a restore consumed it)"
        if not p.state.exists():
            return f"snapshot state {p.state} is missing"
        if not p.ram.exists():
            return f"snapshot RAM file {p.ram} is missing"
        if not vm.meta.ram_in_state and snapshot.ram_inode(p.ram) != vm.meta.ram_inode:
            return "the RAM file was replaced since the snapshot"
        return None

    async def _restore(self, vm: _VM) -> None:
        """cold → hot: a new QEMU maps the same RAM file and loads state.bin.

        The caller applies the transition; a failure here leaves the sandbox in the
        state it started from if the guest never ran, else LOST."""
        p = vm.paths
        before = vm.state
        why = self._snapshot_usable(vm)
        if why is not None:
            raise InvalidState(f"cannot restore {vm.sandbox_id}: {why}")
        await self._create_tap(vm.sandbox_id)
        meta = vm.meta
        ram_in_state = meta.ram_in_state
        phases = _Phases()
        # From here on the new QEMU may write into the RAM file: the snapshot is spent.
        meta.valid = False
        await asyncio.to_thread(snapshot.save_meta, p.snapshot_meta, meta)
        phases.mark("tap+meta")
        threading.Thread(
            target=snapshot.prefetch_ram, args=(p.ram,), name="kiln-prefetch", daemon=True
        ).start()
        guest_ran = False
        try:
            await self._boot(vm, incoming=True)
            phases.mark("qemu")
            await self._qmp(
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
            await self._qmp(vm, "migrate-incoming", {"uri": f"fd:{_SNAPSHOT_FD}"})
            await self._migration_done(vm, "loading the device state")
            phases.mark("load state")
            guest_ran = True
            await self._qmp(vm, "cont")
            phases.mark("cont")
        except BaseException:
            await self._kill(vm)
            if guest_ran:
                self._apply(vm, plan(Op.LOST, vm.state, vm.sandbox_id))
            else:
                # The guest never ran: RAM file and disks are untouched, the snapshot
                # is still good and the sandbox stays as it was, cold (a later start
                # may work), even if a QMP failure on the way marked it crashed.
                vm.state = before
                meta.valid = True
                await asyncio.to_thread(snapshot.save_meta, p.snapshot_meta, meta)
            raise
        if ram_in_state:
            meta.ram_in_state = False  # the RAM now lives in the file, all of it unsynced
            meta.ram_synced = False
        vm.phases = phases.done()
        log.debug("sandbox %s restored: %s", vm.sandbox_id, vm.phases)

    # ------------------------------------------------------------------ destroy

    async def destroy(self, sandbox_id: str) -> None:
        vm = self._vms.get(sandbox_id)
        if vm is None:
            await self._destroy_leftovers(sandbox_id)
            return
        async with vm.lock:
            if vm.destroyed:
                return
            vm.destroyed = True
            await self._cancel_clock(vm)
            try:
                await self._kill(vm)
                for pid in process.find_processes(vm.paths.marker):
                    await process.terminate(pid, vm.paths.marker)
            finally:
                await self._delete_tap(vm.record.tap)
                await self._release_ip(vm.record.ip)
                await asyncio.to_thread(disks.remove_tree, vm.paths.root)
                self._vms.pop(sandbox_id, None)

    async def _destroy_leftovers(self, sandbox_id: str) -> None:
        """Destroy of an id we do not hold: clean whatever a previous run left on disk."""
        if not _ID_RE.match(sandbox_id):
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
            await self._delete_tap(record.tap)
            if self._pool.owner_of(record.ip) == sandbox_id:
                await self._release_ip(record.ip)
        await asyncio.to_thread(disks.remove_tree, root)

    async def _delete_tap(self, tap: str) -> None:
        try:
            await asyncio.to_thread(self._network.delete_tap, tap)
        except NetworkError as exc:
            log.warning("could not delete TAP %s: %s", tap, exc)

    async def _release_ip(self, ip: str) -> None:
        await self._forget_neighbour(ip)
        try:
            self._pool.release(ip)
        except NetworkError as exc:
            log.warning("could not release %s: %s", ip, exc)

    # The host's ARP entry for a guest is pinned (PERMANENT, the guest's fixed MAC)
    # while the sandbox exists, and removed with it. Without the pin, connecting
    # while the guest boots leaves the entry INCOMPLETE and the kernel re-asks only
    # once a second, adding up to ~1 s before the agent is seen; and when an address
    # is reused by a new sandbox (another MAC) a stale entry sends its packets to the
    # old MAC for up to ~45 s. (``ip neigh`` for one address: ~5 ms.)

    async def _ip_neigh(self, *args: str) -> None:
        ns = self.config.network.netns
        argv = ["ip", *(["-n", ns] if ns else []), "neigh", *args]
        try:
            await disks.run_tool(argv, timeout=10)
        except EngineError as exc:
            log.warning("ip neigh %s failed: %s", " ".join(args), exc)

    async def _pin_neighbour(self, ip: str, mac: str) -> None:
        bridge = self.config.network.bridge
        await self._ip_neigh("replace", ip, "lladdr", mac, "dev", bridge, "nud", "permanent")

    async def _forget_neighbour(self, ip: str) -> None:
        await self._ip_neigh("flush", "to", ip, "nud", "all")

    # ------------------------------------------------------------------ recovery

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        vm = self._get(sandbox_id)
        self._observe(vm)
        return {
            "engine": ENGINE_NAME,
            "version": STATE_VERSION,
            "sandbox_id": vm.sandbox_id,
            "record": vm.record.to_json(),
            "pid": vm.pid,
            "status": str(vm.state.status),
            "thermal": str(vm.state.thermal),
            "snapshot_valid": vm.meta.valid,
        }

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        """Re-adopt a sandbox: its live QEMU, else its valid snapshot, else UNKNOWN."""
        try:
            record = Record.from_json(dict(state["record"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidState(f"not a QEMU sandbox state: {exc!r}") from exc
        sid = record.spec.sandbox_id
        if sid in self._vms and not self._vms[sid].destroyed:
            return self.info(sid)
        await self._ensure_ready(None)
        paths = Paths(Path(record.dir))
        meta = snapshot.load_meta(paths.snapshot_meta)
        vm = _VM(
            record=record,
            paths=paths,
            client=self._client_for(record),
            state=ADOPTED[Found.NOTHING],  # until _adopt vouches for more
            meta=meta,
        )
        try:
            self._pool.mark_in_use(record.ip, sid)
        except NetworkError as exc:
            log.error("cannot re-mark %s for %s: %s", record.ip, sid, exc)
            self._vms[sid] = vm
            return self._info(vm)
        if paths.root.is_dir():
            vm.state = ADOPTED[await self._adopt(vm, state.get("pid"))]
        self._vms[sid] = vm
        return self._info(vm)

    async def _adopt(self, vm: _VM, pid_hint: object) -> Found:
        """What survived of the sandbox: its QEMU (running or paused), else a usable
        snapshot (its TAP re-created), else nothing."""
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
                await self._kill(vm)
            else:
                runstate = status.get("status")
                if status.get("running"):
                    return Found.RUNNING
                if runstate in _PAUSED_RUNSTATES:
                    return Found.PAUSED
                log.warning("QEMU of %s is in state %s; killing it", vm.sandbox_id, runstate)
                await self._kill(vm)
        # No live QEMU: a valid snapshot makes it cold, otherwise nothing can be vouched for.
        why = self._snapshot_usable(vm)
        if why is not None:
            log.warning("sandbox %s cannot be recovered: %s", vm.sandbox_id, why)
            return Found.NOTHING
        try:
            await asyncio.to_thread(self._network.create_tap, vm.sandbox_id)
        except NetworkError as exc:
            log.warning("cannot re-create the TAP of %s: %s", vm.sandbox_id, exc)
        await self._pin_neighbour(vm.record.ip, vm.record.mac)  # gone after a host reboot
        return Found.SNAPSHOT

    async def cleanup_orphans(self) -> builtins.list[str]:
        """Remove what belongs to no known sandbox: QEMU processes, TAPs, directories.

        Call after every :meth:`import_state` of a recovery. Returns what was removed.
        """
        await self._ensure_ready(None)
        known = {sid for sid, vm in self._vms.items() if not vm.destroyed}
        removed: builtins.list[str] = []
        sandboxes = self.config.sandboxes_dir
        for entry in sorted(sandboxes.iterdir()) if sandboxes.is_dir() else []:
            if entry.name in known or not entry.is_dir():
                continue
            await self._destroy_leftovers(entry.name)
            removed.append(f"sandbox dir {entry.name}")
        marker = f"{sandboxes}/"
        for pid in process.find_processes(marker):
            owner = next(
                (sid for sid in known if process.pid_alive(pid, self._vms[sid].paths.marker)),
                None,
            )
            if owner is None:
                await process.terminate(pid, marker)
                removed.append(f"qemu pid {pid}")
        if not any(lock.locked() for lock in self._template_locks.values()):
            # No build of ours runs: a template QEMU or half-built directory is a
            # leftover of a daemon that died mid-build.
            tpl_marker = f"{self.config.templates_dir}/"
            for pid in process.find_processes(tpl_marker):
                await process.terminate(pid, tpl_marker)
                removed.append(f"template qemu pid {pid}")
            for entry in await asyncio.to_thread(templates.unfinished, self.config.templates_dir):
                await asyncio.to_thread(disks.remove_tree, entry)
                removed.append(f"unfinished template {entry.name}")
        taps = {self._vms[sid].record.tap for sid in known}
        try:
            gone = await asyncio.to_thread(self._network.cleanup_orphans, taps)
        except NetworkError as exc:
            log.warning("orphan TAP cleanup failed: %s", exc)
            gone = builtins.list[str]()
        removed += [f"tap {t}" for t in gone]
        return removed

    async def delete_volume(self, volume_id: str) -> None:
        """Remove the volume's ext4 file (``<volumes_dir>/<id>.ext4``)."""
        for vm in self._vms.values():
            if not vm.destroyed and volume_id in vm.record.volume_paths:
                raise InvalidState(f"volume {volume_id} is attached to {vm.sandbox_id}")
        with _os_errors(f"delete volume {volume_id}"), contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self._volume_path(volume_id))

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Drop QMP connections and the network worker; QEMU processes keep running."""
        self._closed = True
        for vm in list(self._vms.values()):
            await self._cancel_clock(vm)
            await self._drop_qmp(vm)
        await asyncio.to_thread(self._network.close)


def _rotate(path: Path, limit: int = _LOG_LIMIT) -> None:
    """Keep one previous generation of a log that QEMU appends to across restores."""
    with contextlib.suppress(OSError):
        if path.stat().st_size > limit:
            path.replace(path.with_name(path.name + ".1"))


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Host file-system trouble (disk full, permissions) as an EngineError."""
    try:
        yield
    except OSError as exc:
        raise EngineError(f"{what} failed: {exc}") from exc


def _write_initial_files(paths: Paths, record: Record) -> snapshot.SnapshotMeta:
    """Blocking: the empty RAM file, snapshot.json (no snapshot yet), sandbox.json."""
    meta = snapshot.SnapshotMeta()
    meta.ram_inode = snapshot.create_ram_file(paths.ram, record.spec.memory_mb << 20)
    snapshot.save_meta(paths.snapshot_meta, meta)
    snapshot.write_json_atomic(paths.record, record.to_json())
    return meta


def _write_clone_files(
    paths: Paths, record: Record, template: templates.Template
) -> snapshot.SnapshotMeta:
    """Blocking: the template's device state, a snapshot.json vouching for it and
    the RAM file (copied already), sandbox.json: a cold sandbox ready to restore."""
    shutil.copyfile(template.paths.state, paths.state)
    meta = snapshot.SnapshotMeta(valid=True, ram_inode=snapshot.ram_inode(paths.ram))
    snapshot.save_meta(paths.snapshot_meta, meta)
    snapshot.write_json_atomic(paths.record, record.to_json())
    return meta


def _unlinker(path: Path) -> Callable[[], Awaitable[None]]:
    async def unlink() -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)

    return unlink


__all__ = ["ENGINE_NAME", "QemuEngine"]
