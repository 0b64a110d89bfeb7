"""One sandbox's QEMU as the engine holds it (:class:`VM`), and the steps every
operation on it is made of: boot, QMP commands, kill, noticing a death.

Nothing here touches engine-wide state; what a step needs of the engine's
configuration is passed in. A VM's state changes only in :func:`apply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
)
from kiln.engine.dial import agent_dialer
from kiln.images import kernel_cmdline_defaults
from kiln.network import netns_exec_argv

from ..base import SandboxInfo
from ..boots import LastBoot
from ..errors import EngineError, SandboxCrashed
from ..states import Op, State, Transition, plan
from . import disks, process, snapshot
from .accel import Accel
from .argv import NetDevice, VMConfig, build_argv
from .config import QemuConfig
from .layout import Paths, Record
from .qmp import QMP

log = logging.getLogger(__name__)

ENGINE_NAME: Final = "qemu"
_BOOT_POLL: Final = 0.02
_BOOT_CONNECT_TIMEOUT: Final = 0.1
#: Console and QEMU logs are rotated (one old generation kept) past this size.
_LOG_LIMIT: Final = 8 << 20


@dataclass(eq=False)
class VM:
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
    last_boot: LastBoot | None = None
    #: No machine and no usable snapshot, its disks intact: its next restore is a
    #: boot from them (a reboot; set by recovery and by a crash, see
    #: :mod:`kiln.engine.states`).
    reboot: bool = False
    #: Why it is in error, when recovery or a crash found out (its disk is gone).
    problem: str | None = None

    @property
    def sandbox_id(self) -> str:
        return self.record.spec.sandbox_id


class Phases:
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


def sandbox_info(vm: VM) -> SandboxInfo:
    return SandboxInfo.of(
        vm.record.spec,
        ENGINE_NAME,
        vm.state,
        vm.record.ip,
        has_snapshot=vm.meta.valid,
        last_boot=vm.last_boot,
        problem=vm.problem,
    )


# ---------------------------------------------------------------------- state


def apply(vm: VM, step: Transition) -> None:
    """Where a sandbox's state changes: to a planned transition's ``next``.

    (Its first state is :data:`~kiln.engine.states.CREATED` or
    :data:`~kiln.engine.states.ADOPTED`'s; a restore that fails before the guest
    ran puts back the state it started from.)"""
    vm.state = step.next


def notice_death(vm: VM) -> bool:
    """Apply the death of a sandbox whose QEMU vanished (see :func:`died`); True if it
    had."""
    if vm.state.live and not process.pid_alive(vm.pid, vm.paths.marker):
        log.warning("QEMU of sandbox %s (pid %s) is gone", vm.sandbox_id, vm.pid)
        # The crash's kill: the process is gone already, the QMP connection is
        # dropped by the next transition (this runs in lock-free observers too).
        vm.pid = None
        died(vm)
        return True
    return False


def died(vm: VM) -> str:
    """Apply the death of the sandbox's QEMU (gone, or killed by us): with its disks
    intact it is running and cold, and its next use boots it from them (CRASH, a
    reboot: files kept, processes lost); without them it is in error (LOST). What
    became of it, for a message.

    (Checking the disks blocks, briefly: a few opens and reads of headers, once per
    death, also in the lock-free observers -- which have no loop to hand it to.)
    """
    missing = why_unbootable(vm)
    if missing is None:
        apply(vm, plan(Op.CRASH, vm.state, vm.sandbox_id))
        vm.reboot = True
        return "it boots again from its disks on its next use (files kept, processes lost)"
    vm.problem = missing
    apply(vm, plan(Op.LOST, vm.state, vm.sandbox_id))
    log.error("sandbox %s cannot boot again: %s", vm.sandbox_id, missing)
    return f"it cannot boot again: {missing}; it can only be deleted"


def why_unbootable(vm: VM) -> str | None:
    """Blocking: why the sandbox cannot boot from its disks (one is missing or
    unreadable), or None if it can."""
    rec = vm.record
    wanted = [(Path(d.path), "disk") for d in rec.drives]
    wanted += [(Path(rec.kernel), "kernel"), (Path(rec.initrd), "initramfs")]
    for path, what in wanted:
        problem = disks.unreadable(path)
        if problem is not None:
            return f"its {what} {path} {problem}"
    return None


def observe(vm: VM) -> None:
    """Death check for the lock-free observers (thermal, info, list).

    While a transition holds the lock, pid and thermal change in steps (a stop
    clears the pid before the sandbox is cold), so a check from outside would
    mistake a snapshot in progress for a crash; the transition notices a real
    death itself.
    """
    if not vm.lock.locked():
        notice_death(vm)


# ---------------------------------------------------------------------- QMP, kill


async def qmp(
    vm: VM,
    command: str,
    arguments: Mapping[str, object] | None = None,
    timeout: float | None = None,  # noqa: ASYNC109
) -> Any:
    """A QMP command; a dead or hung QEMU marks the sandbox crashed (lock held)."""
    if vm.qmp is None:
        raise await _crashed(vm, f"no QMP connection to the QEMU of {vm.sandbox_id}")
    try:
        return await vm.qmp.execute(command, arguments, timeout=timeout)
    except SandboxCrashed as exc:
        raise await _crashed(vm, str(exc)) from exc


async def _crashed(vm: VM, why: str) -> SandboxCrashed:
    log.warning("sandbox %s crashed: %s", vm.sandbox_id, why)
    await kill(vm)
    became = died(vm)
    return SandboxCrashed(f"sandbox {vm.sandbox_id} crashed: {why}; {became}")


async def drop_qmp(vm: VM) -> None:
    conn, vm.qmp = vm.qmp, None
    if conn is not None:
        await conn.close()


async def kill(vm: VM) -> None:
    """Make sure no QEMU of this sandbox runs (idempotent)."""
    await drop_qmp(vm)
    pid = vm.pid if vm.pid is not None else process.read_pid(vm.paths.pidfile)
    await process.terminate(pid, vm.paths.marker)
    vm.pid = None


async def cancel_clock(vm: VM) -> None:
    task, vm.clock_task = vm.clock_task, None
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------- boot


def client_for(
    record: Record, config: QemuConfig, connect_timeout: float | None = None
) -> AgentClient:
    ns = config.network.netns
    ip = record.ip
    timeout = connect_timeout or config.agent_timeout

    endpoint = Endpoint(
        agent_dialer(ns, ip, CONTROL_PORT, timeout),
        agent_dialer(ns, ip, FORWARD_PORT, timeout),
        f"agent of {record.spec.sandbox_id} at {ip}",
    )
    return AgentClient(
        endpoint,
        record.token,
        connect_timeout=timeout,
        auth_timeout=config.agent_timeout,
    )


def _vm_config(vm: VM, config: QemuConfig, tsc_khz: int | None, *, incoming: bool) -> VMConfig:
    rec = vm.record
    spec = rec.spec
    return VMConfig(
        name=spec.sandbox_id,
        qemu=config.qemu_binary,
        kernel=rec.kernel,
        initrd=rec.initrd,
        accel=Accel(rec.accel),
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        console_log=str(vm.paths.console_log),
        qmp_socket=vm.paths.qmp_socket.name,  # relative to the sandbox directory
        ram_path=vm.meta.ram_template or str(vm.paths.ram),
        ram_shared=vm.meta.ram_template is None,
        drives=rec.drives,
        net=NetDevice(rec.tap, rec.mac),
        kernel_args=tuple(kernel_cmdline_defaults(cpu_khz=0)),
        tsc_khz=tsc_khz,
        tb_size_mb=config.tb_size_mb,
        pidfile=str(vm.paths.pidfile),
        incoming=incoming,
    )


async def boot(vm: VM, config: QemuConfig, tsc_khz: int | None, *, incoming: bool) -> None:
    """Start QEMU (daemonized, in the netns) and connect QMP."""
    argv = build_argv(_vm_config(vm, config, tsc_khz, incoming=incoming))
    if nice := process.launch_nice.get():
        argv = ["nice", "-n", str(nice), *argv]
    argv = netns_exec_argv(config.network.netns, argv)
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
    vm.qmp = QMP(vm.sandbox_id, vm.paths.qmp_socket, config.qmp_timeout)
    try:
        await vm.qmp.connect()
    except BaseException:
        await kill(vm)
        raise


async def wait_agent(
    vm: VM,
    config: QemuConfig,
    timeout: float,  # noqa: ASYNC109
    first: Callable[[AgentClient], Awaitable[object]] | None = None,
) -> None:
    """Poll the agent until it answers (to ``first``, a request that may be sent
    again; default ACTIVITY); SandboxCrashed if QEMU dies meanwhile."""
    probe = client_for(vm.record, config, _BOOT_CONNECT_TIMEOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            await (probe.activity() if first is None else first(probe))
            return
        except (AgentConnectError, AgentConnectionLost, AgentTimeout) as exc:
            if not process.pid_alive(vm.pid, vm.paths.marker):
                raise SandboxCrashed(
                    f"sandbox {vm.sandbox_id} died while booting: {console_tail(vm)}"
                ) from exc
            if time.monotonic() > deadline:
                raise SandboxCrashed(
                    f"the agent of {vm.sandbox_id} did not answer within "
                    f"{timeout:.0f} s: {console_tail(vm)}"
                ) from exc
        except AgentError as exc:
            raise EngineError(f"the agent of {vm.sandbox_id} refused us: {exc}") from exc
        await asyncio.sleep(_BOOT_POLL)


def console_tail(vm: VM, lines: int = 6) -> str:
    try:
        text = vm.paths.console_log.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no console output)"


def _rotate(path: Path, limit: int = _LOG_LIMIT) -> None:
    """Keep one previous generation of a log that QEMU appends to across restores."""
    with contextlib.suppress(OSError):
        if path.stat().st_size > limit:
            path.replace(path.with_name(path.name + ".1"))


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Host file-system trouble (disk full, permissions) as an EngineError."""
    try:
        yield
    except OSError as exc:
        raise EngineError(f"{what} failed: {exc}") from exc
