"""Spawners: helper processes that start commands as another user by vfork.

Why: the agent runs as root and most commands run as the sandbox user.
CPython's ``subprocess`` uses vfork only when no user, group or groups change is
asked for; with one it forks, which copies the page tables of the whole agent
(about 23 MB) and then makes the agent pay copy-on-write faults. Under TCG that
is ~9 ms per exec, and ~60 ms on the first exec after a snapshot restore.

A spawner is a child of the agent, forked once per set of credentials, that
switches to them for good and then starts commands with ``posix_spawn`` (glibc:
``clone(CLONE_VM | CLONE_VFORK)``): no copies, no faults. The agent stays the
one that decides everything; the spawner only executes.

Conversation over a ``SOCK_SEQPACKET`` socket pair (one JSON message each)::

    spawner → agent   {"ready": true}               (once, after switching user)
    agent → spawner   {"argv": [...], "env": {...}, "cwd": "..."} + stdin/stdout/stderr fds
    agent → spawner   {"argv": ..., "env": ..., "cwd": ..., "tty": "/dev/pts/N"}  (no fds)
    spawner → agent   {"pid": N} | {"errno": E, "strerror": S, "filename": F} | {"invalid": S}
    spawner → agent   {"exit": N, "code": C}        (whenever one of its children ends)

A command with ``tty`` starts a session of its own (setsid) and opens the
terminal as stdin/stdout/stderr, which makes it its controlling terminal: what
a TTY session needs, without the preexec_fn that makes subprocess fork.

Answers come in request order. The spawner reaps its own children and reports
their exit codes; should it die (it runs as the sandbox user, who may kill it),
the agent adopts its children (they become the agent's orphans) and starts a
new spawner for the next command. A spawner that dies before it said ready has
started nothing, so its requests fall back to the agent's own ``subprocess``.
Its change of credentials makes it non-dumpable, so the user can kill it but
not ptrace it or reach its socket.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import gc
import json
import logging
import os
import select
import signal
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import RequestError, SpawnerUnavailable
from .process import Child, Children, exit_status

log = logging.getLogger(__name__)

#: Requests larger than this (a huge environment) are started by the agent itself.
MAX_MESSAGE = 128 * 1024
#: Spawners kept alive at once (one per user in practice); the least recently used goes.
MAX_SPAWNERS = 4
#: Spawners for one set of credentials that may die before ready before we stop trying.
MAX_START_FAILURES = 3
_RECV_SIZE = MAX_MESSAGE + 4096
_FDS_PER_REQUEST = 3
_COMM = b"kiln-spawner"
_MAX_FD = 0x7FFFFFFF
#: Signals Python ignores at start that a command must get back (as Popen's restore_signals).
_RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ForkedSpawner:
    """A spawner forked before the event loop runs (PID 1, before a template snapshot)."""

    pid: int
    sock: socket.socket
    creds: Credentials


def fork_spawner(creds: Credentials) -> tuple[int, socket.socket]:
    """Fork a spawner process; its pid and the agent's (non-blocking) end of the socket."""
    parent_sock, child_sock = socket.socketpair(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
    )
    # No signal may run a handler of the agent's in the child before it has
    # reset them (asyncio's handlers write to the event loop's wakeup socket).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; coverage does not follow it
            _child_main(child_sock, parent_sock, creds, old_mask)
    except BaseException:
        parent_sock.close()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_sock.close()
    parent_sock.setblocking(False)
    log.debug("spawner %d started for uid %d", pid, creds.uid)
    return pid, parent_sock


class Spawner:
    """The agent's end of one spawner process."""

    def __init__(self, pid: int, sock: socket.socket, creds: Credentials, children: Children):
        self.pid = pid
        self.creds = creds
        self._sock = sock
        self._children = children
        self._answers: collections.deque[asyncio.Future[Child]] = collections.deque()
        self._running: dict[int, Child] = {}
        self._retiring = False
        self._closed = False
        self._ready = False
        #: The spawner process itself, reaped when it exits.
        self.process = children.expect(pid)
        children.adopt(self.process)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def start(cls, creds: Credentials, children: Children) -> Spawner:
        """Fork a spawner with ``creds``. Call on the event-loop thread."""
        pid, sock = fork_spawner(creds)
        return cls(pid, sock, creds, children)

    @property
    def usable(self) -> bool:
        return not self._closed and not self._retiring

    @property
    def failed_to_start(self) -> bool:
        """It died before saying ready (e.g. it could not switch user)."""
        return self._closed and not self._ready

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        cwd: str,
        env: Mapping[str, str],
    ) -> Child:
        """Start ``argv`` in its own process group; raises OSError/ValueError as Popen would.

        SpawnerUnavailable: nothing was sent, the caller may start it another way.
        RequestError: the spawner died with the request, whose fate is unknown.
        """
        request = {"argv": list(argv), "env": dict(env), "cwd": cwd}
        return await self._request(request, [stdin, stdout, stderr])

    async def spawn_on_terminal(
        self, argv: Sequence[str], *, tty: str, cwd: str, env: Mapping[str, str]
    ) -> Child:
        """Start ``argv`` as the leader of a new session whose controlling terminal
        is the pty slave ``tty`` (a path). Errors as :meth:`spawn`."""
        return await self._request(
            {"argv": list(argv), "env": dict(env), "cwd": cwd, "tty": tty}, []
        )

    async def _request(self, request: dict[str, Any], fds: list[int]) -> Child:
        if not self.usable:
            raise SpawnerUnavailable
        # ensure_ascii: lone surrogates (undecodable bytes) travel as escapes.
        message = json.dumps(request).encode()
        if len(message) > MAX_MESSAGE:
            raise SpawnerUnavailable
        try:
            socket.send_fds(self._sock, [message], fds)
        except OSError as exc:  # full (BlockingIOError) or gone (EPIPE): not sent
            if not isinstance(exc, BlockingIOError):
                self._die()
            raise SpawnerUnavailable from exc
        answer: asyncio.Future[Child] = asyncio.get_running_loop().create_future()
        self._answers.append(answer)
        return await answer

    def retire(self) -> None:
        """Start nothing more; go away once the commands it started have ended."""
        self._retiring = True
        if not self._running and not self._answers:
            self.close()

    def close(self) -> None:
        """Hang up (the spawner exits on EOF); commands still running are adopted."""
        if self._closed:
            return
        self._closed = True
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        for answer in self._answers:
            if not answer.done():
                # Before "ready" nothing was started: the caller may start it itself.
                answer.set_exception(
                    RequestError("the command launcher went away while starting the command")
                    if self._ready
                    else SpawnerUnavailable()
                )
        self._answers.clear()
        for child in self._running.values():
            self._children.adopt(child)
        self._running.clear()

    def _die(self) -> None:
        if not self._closed:
            log.warning("spawner %d (uid %d) is gone", self.pid, self.creds.uid)
        self.close()

    def _on_readable(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._die()
                return
            try:
                message = json.loads(data)
            except ValueError:
                log.error("spawner %d sent garbage: %r", self.pid, data[:100])
                self._die()
                return
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "ready" in message:
            self._ready = True
            return
        if "exit" in message:
            child = self._running.pop(int(message["exit"]), None)
            if child is not None:
                self._children.reported_exit(child, int(message["code"]))
            if self._retiring and not self._running and not self._answers:
                self.close()
            return
        if not self._answers:
            log.error("spawner %d answered a request nobody made", self.pid)
            self._die()
            return
        answer = self._answers.popleft()
        if "pid" in message:
            # Registered at once: its exit may be in the very next message.
            pid = int(message["pid"])
            child = self._running[pid] = self._children.expect(pid)
            if answer.done():
                # Its requester was cancelled meanwhile: nobody will read or wait
                # for this command, so it is killed (and still reaped).
                child.kill_group(signal.SIGKILL)
            else:
                answer.set_result(child)
        elif not answer.done():
            if "errno" in message:
                error: Exception = OSError(
                    message["errno"], message["strerror"], message.get("filename")
                )
            else:
                error = ValueError(message.get("invalid", "invalid request"))
            answer.set_exception(error)


class Spawners:
    """The spawners of a running agent, one per set of credentials, started on demand."""

    def __init__(self, children: Children) -> None:
        self._children = children
        self._by_creds: dict[Credentials, Spawner] = {}
        self._start_failures: collections.Counter[Credentials] = collections.Counter()

    def add(self, forked: ForkedSpawner) -> None:
        """Take over a spawner forked before the event loop ran."""
        spawner = Spawner(forked.pid, forked.sock, forked.creds, self._children)
        previous = self._by_creds.pop(forked.creds, None)
        if previous is not None:
            previous.retire()
        self._by_creds[forked.creds] = spawner

    def get(self, creds: Credentials) -> Spawner:
        """The spawner for ``creds``; SpawnerUnavailable if none can be had."""
        spawner = self._by_creds.get(creds)
        if spawner is not None and spawner.failed_to_start:
            self._start_failures[creds] += 1
            if self._start_failures[creds] == MAX_START_FAILURES:
                log.warning("cannot start a spawner for uid %d: using fork", creds.uid)
        if self._start_failures[creds] >= MAX_START_FAILURES:
            raise SpawnerUnavailable
        if spawner is not None and spawner.usable:
            # Most recently used last: the first entry is the one to retire.
            self._by_creds[creds] = self._by_creds.pop(creds)
            return spawner
        if spawner is not None:
            del self._by_creds[creds]
        for other in [c for c in self._by_creds if c.uid == creds.uid]:
            # The same user with other groups: the user database changed.
            self._by_creds.pop(other).retire()
        while len(self._by_creds) >= MAX_SPAWNERS:
            self._by_creds.pop(next(iter(self._by_creds))).retire()
        try:
            spawner = Spawner.start(creds, self._children)
        except OSError as exc:  # out of processes or memory
            raise SpawnerUnavailable from exc
        self._by_creds[creds] = spawner
        return spawner

    def close(self) -> None:
        for spawner in self._by_creds.values():
            spawner.close()
        self._by_creds.clear()


# ---- the spawner process ------------------------------------------------------------


def _child_main(
    sock: socket.socket, parent_sock: socket.socket, creds: Credentials, mask: set[Any]
) -> NoReturn:  # pragma: no cover - runs in the forked child
    """Become the spawner: drop the agent's state and privileges, then serve."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()  # a collection would touch (and so copy) the agent's whole heap
        parent_sock.detach()  # closed below with every other inherited fd
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, _MAX_FD)  # close_range(2): cheap whatever the bound
        os.setsid()  # out of the agent's process group: no group signal meant for it
        # Named while still root: once non-dumpable, its /proc files belong to root.
        with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as f:
            f.write(_COMM)
        os.setgroups(list(creds.groups))
        os.setresgid(creds.gid, creds.gid, creds.gid)
        os.setresuid(creds.uid, creds.uid, creds.uid)
        sock.setblocking(True)
        sock.send(b'{"ready": true}')
        _serve(sock, mask)
    except BaseException:  # nothing may escape into the agent's code
        code = 1
    os._exit(code)


def _serve(sock: socket.socket, mask: set[Any]) -> None:  # pragma: no cover - child
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 64):
                        pass
                _report_exits(sock)
            elif not _handle_request(sock):
                return


def _report_exits(sock: socket.socket) -> None:  # pragma: no cover - child
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = exit_status(os.waitstatus_to_exitcode(status))
        sock.send(json.dumps({"exit": pid, "code": code}).encode())


def _handle_request(sock: socket.socket) -> bool:  # pragma: no cover - child
    """Serve one request; False when the agent hung up."""
    try:
        data, fds = _recv_fds(sock)
    except InterruptedError:
        return True
    if not data:
        return False
    try:
        request = json.loads(data)
        expected = 0 if "tty" in request else _FDS_PER_REQUEST
        if len(fds) != expected:
            reply: dict[str, Any] = {"invalid": f"expected {expected} descriptors, got {len(fds)}"}
        else:
            reply = _start(request, fds)
    finally:
        for fd in fds:
            os.close(fd)
    sock.send(json.dumps(reply).encode())
    return True


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:  # pragma: no cover - child
    """One message and the descriptors that came with it, each close-on-exec.

    Not ``socket.recv_fds``: CPython 3.11's drops its ``flags`` argument,
    so MSG_CMSG_CLOEXEC never reached the kernel and every descriptor received
    stayed inheritable. posix_spawn closes only close-on-exec descriptors, so
    each command got a second copy of its own pipes above fd 2, and a background
    child that redirected its output (``nohup srv >/dev/null 2>&1 &``) still
    held the exec's stdout and stderr open: the exec never saw EOF and hung.
    """
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        _RECV_SIZE, socket.CMSG_SPACE(_FDS_PER_REQUEST * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _start(request: dict[str, Any], fds: list[int]) -> dict[str, Any]:  # pragma: no cover
    argv: list[str] = request["argv"]
    env: dict[str, str] = request["env"]
    cwd: str = request["cwd"]
    try:
        os.chdir(cwd)
    except OSError as exc:
        return _os_error(exc, cwd)
    tty: str | None = request.get("tty")
    actions: list[tuple[Any, ...]]
    if tty is None:
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        group: dict[str, Any] = {"setpgroup": 0}
    else:
        # glibc runs setsid() before the file actions: opening the terminal
        # (without O_NOCTTY) then makes it the new session's controlling one.
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, tty, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        group = {"setsid": True}
    first_error: OSError | None = None
    try:
        for path in _candidates(argv[0], env):
            try:
                pid = os.posix_spawn(
                    path,
                    argv,
                    env,
                    file_actions=actions,
                    setsigdef=_RESTORED_SIGNALS,
                    **group,
                )
            except OSError as exc:
                # As execvp: a missing file means "try the next directory".
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and first_error is None:
                    first_error = exc
                continue
            return {"pid": pid}
    except ValueError as exc:  # NUL in an argument, '=' in an environment name
        return {"invalid": str(exc)}
    if first_error is not None:
        return _os_error(first_error, argv[0])
    return _os_error(OSError(errno.ENOENT, os.strerror(errno.ENOENT)), argv[0])


def _candidates(name: str, env: Mapping[str, str]) -> Iterator[str]:  # pragma: no cover
    """Where ``name`` may be, in PATH order; a directory it is not in costs a
    stat() rather than a clone() (none found: the caller answers ENOENT)."""
    if not name or "/" in name:
        yield name
        return
    for directory in os.get_exec_path(dict(env)):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            yield path


def _os_error(exc: OSError, filename: str) -> dict[str, Any]:  # pragma: no cover - child
    return {
        "errno": exc.errno,
        "strerror": exc.strerror or os.strerror(exc.errno or 0),
        "filename": filename,
    }
