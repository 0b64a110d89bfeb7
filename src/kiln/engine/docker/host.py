"""Processes, mounts and cgroups on the host, as far as a private dockerd leaves them.

Plain ``/proc`` and cgroupfs reads plus ``kill``/``umount2``; no Docker API.
Used to stop dockerd cleanly and to clear what a crashed one left.

Where PID 1 does not reap the orphans it inherits (these hosts), a killed
containerd, shim or container process stays a zombie: zombies count as gone
everywhere here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

#: Seconds SIGKILL is given to take processes down before we stop waiting.
KILL_WAIT: Final = 10.0
_MNT_DETACH: Final = 2

# -- processes ----------------------------------------------------------------------------


def cmdline(pid: int) -> list[str] | None:
    """The arguments of ``pid`` (empty for a zombie), or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited (a zombie, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # "pid (comm) S ...": comm may contain spaces and parentheses; the state follows the last ')'.
    return stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


def mentions(argv: Iterable[str], path: Path) -> bool:
    """Whether a command line names ``path`` or something below it, as an argument
    (``/p``, ``/p/x``) or as an option value (``--root=/p/x``)."""
    p = str(path)
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if value == p or value.startswith(p + "/"):
            return True
    return False


def processes_mentioning(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (see :func:`mentions`), not us."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = cmdline(int(entry.name))
        if argv and mentions(argv, path) and not is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return found


def pid_from_file(pidfile: Path, marker: str) -> int | None:
    """The pid in ``pidfile`` if that process lives and has ``marker`` among its arguments
    (a pid alone proves nothing: pids are reused)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    argv = cmdline(pid)
    if not argv or marker not in argv or is_zombie(pid):
        return None
    return pid


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Wait until ``pid`` has exited (reaping it if ``proc`` is it); True if it did."""
    if proc is not None and proc.pid == pid:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


def wait_all_gone(pids: Sequence[int], timeout: float = KILL_WAIT) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        wait_gone(pid, max(0.0, deadline - time.monotonic()))


def terminate(pid: int, grace: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, up to ``grace`` seconds, then SIGKILL (and reap ``proc``)."""
    send_signal(pid, signal.SIGTERM)
    if not wait_gone(pid, grace, proc):
        send_signal(pid, signal.SIGKILL)
        wait_gone(pid, KILL_WAIT, proc)


# -- mounts -------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` per line of ``/proc/PID/mountinfo``, in order."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        out.append((_unescape(fields[4]), right.split(" ", 1)[0]))
    return out


def mounts() -> list[tuple[str, str]]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def mounts_below(paths: Sequence[Path]) -> list[str]:
    """Mount points at or below any of ``paths``, latest (innermost) first."""
    found = []
    for point, _ in reversed(mounts()):
        if any(point == str(p) or point.startswith(f"{p}/") for p in paths):
            found.append(point)
    return found


_libc: ctypes.CDLL | None = None


def unmount(path: str) -> bool:
    """Lazily unmount ``path`` (``umount2(MNT_DETACH)``); True if it was unmounted."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return int(_libc.umount2(os.fsencode(path), _MNT_DETACH)) == 0


# -- cgroups ------------------------------------------------------------------------------


def cgroup_dirs(parent: str) -> list[Path]:
    """``parent`` (``/kiln-dockerd-x``) in every mounted cgroup hierarchy where it exists."""
    dirs = []
    for point, fstype in mounts():
        if fstype in ("cgroup", "cgroup2"):
            candidate = Path(point) / parent.lstrip("/")
            if candidate.is_dir():
                dirs.append(candidate)
    return dirs


def set_cpu_shares(pid: int, shares: int) -> None:
    """The CPU weight of process ``pid``'s cgroup, written to cgroupfs directly: cgroup
    v1's ``cpu.shares``, else v2's ``cpu.weight`` (runc's conversion). Docker's own
    record of the container's weight is left as it was. Raises OSError."""
    points = [point for point, fstype in mounts() if fstype in ("cgroup", "cgroup2")]
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for point in points:
            group = Path(point) / path.lstrip("/")
            if "cpu" in controllers.split(",") and (group / "cpu.shares").is_file():
                (group / "cpu.shares").write_text(str(shares))
                return
            if controllers == "" and (group / "cpu.weight").is_file():
                weight = 1 + ((shares - 2) * 9999) // 262142
                (group / "cpu.weight").write_text(str(weight))
                return
    raise OSError(f"no CPU controller of process {pid} found in the cgroup mounts")


def cgroup_tree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, children before parents."""
    return [Path(d) for d, _, _ in os.walk(top, topdown=False)]


def cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _thaw(group: Path) -> None:
    for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
        with contextlib.suppress(OSError):
            (group / name).write_text(value)


def kill_cgroups(parent: str) -> tuple[list[Path], list[int]]:
    """SIGKILL every task under cgroup ``parent`` in every hierarchy, thawing frozen
    (paused) groups after the signal so it lands; return the groups, children first,
    and the pids signalled."""
    groups = [g for top in cgroup_dirs(parent) for g in cgroup_tree(top)]
    pids: list[int] = []
    for group in groups:
        for pid in cgroup_pids(group):
            if pid not in pids:
                pids.append(pid)
            send_signal(pid, signal.SIGKILL)
        _thaw(group)
    return groups, pids


def remove_cgroups(groups: Sequence[Path], attempts: int = 50) -> list[str]:
    """rmdir each group (children first); retried briefly, as a killed task takes a
    moment to leave. Returns the ones removed."""
    removed = []
    for group in groups:
        for _ in range(attempts):
            try:
                group.rmdir()
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
                continue
            removed.append(str(group))
            break
    return removed
