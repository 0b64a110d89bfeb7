"""Starting, finding and stopping QEMU processes.

QEMU runs with ``-daemonize``: the process we spawn exits once the VM is set up
(its exit status and stderr say whether that worked) and the real QEMU lives on
in its own session, reparented to init. A daemon crash or restart therefore
never takes a sandbox down, and recovery re-adopts the process by its pid file.

A pid alone is not proof of identity (pids are reused), so every check also
looks for a marker -- the sandbox directory -- in ``/proc/PID/cmdline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO, Final

from ..errors import EngineError

#: The niceness of the QEMU processes and host tools the current task starts: the
#: warm pool's refills run theirs low (see .pool), so they take only the CPU that
#: sandboxes leave. A context variable, so that the create path they share with
#: every create needs no new argument.
launch_nice: ContextVar[int] = ContextVar("launch_nice", default=0)

LAUNCH_TIMEOUT: Final = 30.0
_POLL: Final = 0.005


class LaunchFailed(EngineError):
    """QEMU refused to start (bad arguments, missing TAP, unreadable image...)."""


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


async def launch(
    argv: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    pidfile: Path,
    timeout: float = LAUNCH_TIMEOUT,  # noqa: ASYNC109
) -> int:
    """Run a ``-daemonize`` QEMU command line and return the daemon's pid.

    QEMU's own messages (startup errors included) are appended to ``log_path``.
    """
    _remove(pidfile)
    with _open_append(log_path) as log:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchFailed(f"cannot run {argv[0]}: {exc.strerror}") from exc
    try:
        async with asyncio.timeout(timeout):
            code = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise LaunchFailed(f"QEMU did not finish starting within {timeout:.0f} s") from None
    if code != 0:
        raise LaunchFailed(f"QEMU exited with {code}: {_tail(log_path) or 'no message'}")
    pid = read_pid(pidfile)
    if pid is None:
        raise LaunchFailed(f"QEMU started but wrote no pid file ({pidfile})")
    return pid


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _open_append(path: Path) -> BinaryIO:
    return open(path, "ab")


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int | None, marker: str) -> bool:
    """True if ``pid`` runs (not a zombie) and its command line contains ``marker``."""
    if pid is None or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may contain spaces.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    if state in (b"Z", b"X"):
        return False
    return os.fsencode(marker) in cmdline


async def wait_gone(pid: int, marker: str, timeout: float) -> bool:  # noqa: ASYNC109
    """Poll until the process is gone; False if it still runs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL)
    return True


async def terminate(pid: int | None, marker: str, grace: float = 2.0) -> None:
    """SIGTERM, a grace period, then SIGKILL; returns once the process is gone.

    Shielded from cancellation: a half-killed QEMU is worse than a late caller.
    """
    if pid is None or not pid_alive(pid, marker):
        return
    await asyncio.shield(_terminate(pid, marker, grace))


async def _terminate(pid: int, marker: str, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not pid_alive(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if await wait_gone(pid, marker, wait):
            return
    raise EngineError(f"QEMU process {pid} survived SIGKILL")


def set_nice(pid: int, value: int) -> None:
    """The niceness of every thread of ``pid`` (setpriority on Linux is per thread)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), value)


def find_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker`` (orphan scan)."""
    found: list[int] = []
    needle = os.fsencode(marker)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(entry), marker):
            found.append(int(entry))
    return found
