"""Child processes: spawning, exit watching through pidfds, and the orphan reaper.

Nothing in the agent ever calls ``waitpid(-1)``. Each child the agent starts is
watched through its own pidfd (readable once it has exited) and reaped by
``Popen.poll()``, i.e. ``waitpid(pid)`` for that pid only.

PID 1 (or a subreaper, ``--reap-orphans``) also inherits orphans: processes
whose parent died, such as a daemon a command started in the background. They
are reaped by :meth:`Children.reap_orphans`, which runs on SIGCHLD: it lists the
agent's zombie children (``/proc/self/task/*/children`` + ``/proc/PID/stat``)
and reaps each one that is **not** in the set of managed pids, individually.

Why this never steals a managed child's exit status: a pid enters the managed
set in the same synchronous step in which it is forked (``Popen()`` returns and
``spawn`` registers it before any other event-loop callback can run), and
leaves it only after its own pidfd callback reaped it. The reaper is itself an
event-loop callback (SIGCHLD goes through the loop's wakeup fd), so it cannot
run between fork and registration. The invariant that makes this hold: while
the reaper is active, every fork goes through :meth:`Children.spawn` on the
event-loop thread (boot-time helpers such as ``ip`` run before it starts).

Where the kernel has no ``pidfd_open`` (gVisor's 2022 runsc answers ENOSYS), a
child is checked on every SIGCHLD instead, still with ``waitpid`` for its own
pid only (:meth:`Children._poll_children`).

Commands started by a spawner (:mod:`kiln.guest.spawner`) are the spawner's
children, reaped by it, which reports their exit codes. They are managed too
(:meth:`Children.expect`), from the moment their pid is known: should their
spawner die, they become our orphans, and the reaper leaves them to
:meth:`Children.adopt`, which collects their status through a pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
#: Exit code of a child whose status nobody could collect.
UNKNOWN_EXIT = 255


def exit_status(returncode: int) -> int:
    """A Popen return code as the wire's exit code: killed by signal N → 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Child:
    """A process the agent started, directly (:meth:`Children.spawn`) or through a
    spawner helper (:meth:`Children.expect`)."""

    __slots__ = ("_exited", "_pidfd", "_popen", "pid")

    def __init__(
        self, pid: int, exited: asyncio.Future[int], popen: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.pid = pid
        self._popen = popen
        self._exited = exited
        self._pidfd = -1

    @property
    def exited(self) -> bool:
        return self._exited.done()

    async def wait(self) -> int:
        """The exit code; shielded, so a cancelled waiter does not cancel the others."""
        return await asyncio.shield(self._exited)

    def on_exit(self, callback: Any) -> None:
        """Call ``callback(child)`` once the child has been reaped."""
        self._exited.add_done_callback(lambda _fut: callback(self))

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child's process group (its pgid is its pid: spawned as a group leader)."""
        # ProcessLookupError: the group is gone (every member exited), nothing to signal.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


class Children:
    """Every child the agent started, plus (optionally) the orphan reaper."""

    def __init__(self) -> None:
        self._managed: dict[int, Child] = {}
        #: Children watched without a pidfd (none on this kernel): checked on SIGCHLD.
        self._polled: dict[int, Child] = {}
        self._scan_pending = False
        self._sigchld = False  # our SIGCHLD handler is installed
        self._reaping = False  # we reap orphans (PID 1, a subreaper)

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> Child:
        """Start ``argv`` (``subprocess.Popen`` arguments) and watch it for exit.

        Must be called on the event-loop thread. Raises what Popen raises
        (OSError for a command that cannot be started, ValueError for bad
        arguments); nothing is left behind then.
        """
        loop = asyncio.get_running_loop()
        popen: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **popen_kwargs)
        child = Child(popen.pid, loop.create_future(), popen)
        self._managed[popen.pid] = child
        try:
            self._watch(child)
        except OSError:
            # Out of fds: we cannot watch it, so do not leave it running unwatched.
            popen.kill()
            popen.wait()
            del self._managed[popen.pid]
            raise
        return child

    def expect(self, pid: int) -> Child:
        """A process another process (a spawner) started for us and reports the exit of.

        It is managed from here on: should its parent die first, it becomes our
        orphan and the reaper leaves it to :meth:`adopt`.
        """
        child = Child(pid, asyncio.get_running_loop().create_future())
        self._managed[pid] = child
        return child

    def reported_exit(self, child: Child, code: int) -> None:
        """The exit code of an :meth:`expect`-ed child, from the process that reaped it."""
        if self._managed.get(child.pid) is child:
            del self._managed[child.pid]
        if not child._exited.done():
            child._exited.set_result(code)

    def adopt(self, child: Child) -> None:
        """An :meth:`expect`-ed child whose parent died: watch it ourselves.

        Its exit status comes from ``waitpid`` if it became our child (we are PID 1
        or a subreaper), else it is unknown (255)."""
        if child.exited:
            return
        try:
            self._watch(child)
        except OSError:  # already gone, and reaped by its parent before it died
            log.warning("lost the exit status of pid %d", child.pid)
            self.reported_exit(child, UNKNOWN_EXIT)

    def _watch(self, child: Child) -> None:
        try:
            pidfd = os.pidfd_open(child.pid)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            self._polled[child.pid] = child
            self._handle_sigchld()
            asyncio.get_running_loop().call_soon(self._poll_children)  # it may be gone already
            return
        child._pidfd = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, child)

    def _on_exit(self, child: Child) -> None:
        if child._popen is not None:
            returncode = child._popen.poll()  # waitpid(child.pid, WNOHANG)
            if returncode is None:
                return  # cannot happen for a readable pidfd; wait for the next wakeup
            code = exit_status(returncode)
        else:
            code = _reap_adopted(child.pid)
        loop = asyncio.get_running_loop()
        loop.remove_reader(child._pidfd)
        os.close(child._pidfd)
        child._pidfd = -1
        del self._managed[child.pid]
        child._exited.set_result(code)

    def _poll_children(self) -> None:
        """Reap the children watched without a pidfd that have exited, each by its pid."""
        for pid, child in list(self._polled.items()):
            if child._popen is not None:
                returncode = child._popen.poll()  # waitpid(child.pid, WNOHANG)
                if returncode is None:
                    continue
                code = exit_status(returncode)
            else:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # not ours: only /proc can tell it is gone
                    if os.path.exists(f"/proc/{pid}"):
                        continue
                    log.warning("lost the exit status of pid %d", pid)
                    done, status = pid, -1
                if not done:
                    continue
                code = (
                    UNKNOWN_EXIT if status == -1 else exit_status(os.waitstatus_to_exitcode(status))
                )
            del self._polled[pid]
            if self._managed.get(pid) is child:
                del self._managed[pid]
            if not child._exited.done():
                child._exited.set_result(code)

    def close(self) -> None:
        """Stop watching (at agent exit); running children are not touched."""
        if self._sigchld:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
            self._sigchld = self._reaping = False

    # ---- orphans -----------------------------------------------------------------

    def start_reaping_orphans(self) -> None:
        """Reap orphans on every SIGCHLD (PID 1, or a subreaper)."""
        self._reaping = True
        self._handle_sigchld()
        self._schedule_scan()

    def _handle_sigchld(self) -> None:
        if not self._sigchld:
            asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self._schedule_scan)
            self._sigchld = True

    def _schedule_scan(self) -> None:
        # A burst of SIGCHLDs needs one scan, not one each.
        if not self._scan_pending:
            self._scan_pending = True
            asyncio.get_running_loop().call_soon(self._scan)

    def _scan(self) -> None:
        self._scan_pending = False
        try:
            self._poll_children()
            if self._reaping:
                self.reap_orphans()
        except Exception:  # the reaper must never take the agent down
            log.exception("orphan reaper failed")

    def reap_orphans(self) -> list[int]:
        """Reap every zombie child that is not managed; returns the pids reaped."""
        reaped = []
        for pid in zombie_children():
            if pid in self._managed:
                continue  # its own pidfd callback reaps it, with its status
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done:
                reaped.append(pid)
        if reaped:
            log.debug("reaped orphans %s", reaped)
        return reaped


def _reap_adopted(pid: int) -> int:
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its status went to someone else
        log.warning("lost the exit status of pid %d", pid)
        return UNKNOWN_EXIT
    if not done:  # pragma: no cover - the pidfd said it exited
        log.warning("pid %d reported as exited but is not a zombie", pid)
        return UNKNOWN_EXIT
    return exit_status(os.waitstatus_to_exitcode(status))


def zombie_children(parent: int | None = None) -> list[int]:
    """Pids of the zombie children of ``parent`` (default: this process)."""
    me = os.getpid() if parent is None else parent
    candidates = _children_of(me)
    zombies = []
    for pid in candidates:
        stat = _read_stat(pid)
        if stat is not None and stat[0] == "Z" and stat[1] == me:
            zombies.append(pid)
    return zombies


def _children_of(pid: int) -> set[int]:
    """Child pids from /proc/PID/task/*/children, or a full /proc scan without it."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.update(int(p) for p in f.read().split())
        return found
    except FileNotFoundError:
        pass  # task gone mid-listing, or a kernel without CONFIG_PROC_CHILDREN
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def become_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans of our descendants come to us, as to PID 1."""
    import ctypes  # noqa: PLC0415 - only needed for this option

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
