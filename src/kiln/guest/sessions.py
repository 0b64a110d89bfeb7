"""TTY sessions: a command on a pty that outlives its host connections.

Each session has an id (``s1``, ``s2``, … or ``init``), a pty, a scrollback
:class:`OutputLog` (stdout only) and at most one attached host connection. One pump task per
session reads the pty master all the time, attached or not: output goes into
the scrollback and, when a client is attached, out as STDOUT frames.

- Host disconnect = detach; the idle timer (if configured) starts.
- Attach (``session_id``): SESSION_INFO, the scrollback as one STDOUT frame
  (possibly empty), then live output. A previously attached client gets
  ``EXIT -1`` (:data:`DETACHED_EXIT`: "someone else attached", not an exit
  status) and is disconnected.
- A new session answers SESSION_INFO (so the host learns the id), then live output.
- RESIZE → TIOCSWINSZ; KILL → SIGTERM to the session's process group.
- EXEC_KILL (own connection) → SIGKILL, wait for the session to end, remove it
  from the listing, answer ``EXIT 0``.
- Process exit: the attached client gets the remaining output and EXIT(code);
  the session stays listed until killed or evicted (the oldest finished
  sessions beyond ``max_finished_sessions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import shlex
import signal
import struct
import subprocess
import termios
import time
from collections import deque
from collections.abc import Sequence

from kiln.protocol import (
    CHUNK_SIZE,
    INIT_SESSION_ID,
    ExecRequest,
    FrameStream,
    FrameType,
    ProcessInfo,
    ProcessStart,
    ProcessStatus,
    Reason,
    SessionInfo,
    decode_resize,
    encode_exit,
)

from .context import GuestContext, recv_frame
from .errors import RequestError
from .execution import EXIT_CANNOT_EXECUTE, refuse_start, spawn_failure
from .fdio import FdWriter, close_fd, wake
from .output import OutputLog
from .process import Child
from .processes import ProcessTable

log = logging.getLogger(__name__)

#: EXIT code sent to a client that is detached because another one attached.
DETACHED_EXIT = -1
#: After the session leader exits, wait this long for output of processes that
#: still hold the pty (background jobs) before ending the session anyway.
EXIT_GRACE = 0.2
#: Attached client's unsent output above which the pump waits for it (flow control).
CLIENT_HIGH_WATER = 1 << 20
#: How long EXEC_KILL waits for a SIGKILLed session to end.
KILL_WAIT = 5.0
DEFAULT_ROWS, DEFAULT_COLS = 24, 80
#: Scrollback kept per session.
SCROLLBACK = 64 * 1024
#: What closing a terminal's input means: end-of-file (Ctrl-D) at the line discipline.
EOF_CHAR = b"\x04"


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Attachment:
    """The host connection attached to a session."""

    __slots__ = ("conn",)

    def __init__(self, conn: FrameStream) -> None:
        self.conn = conn

    async def send_output(self, data: bytes) -> None:
        transport = self.conn.writer.transport
        if transport.is_closing():
            return  # it left; its handler detaches it
        self.conn.write(FrameType.STDOUT, data)
        if transport.get_write_buffer_size() > CLIENT_HIGH_WATER:
            with contextlib.suppress(ConnectionError):
                await self.conn.writer.drain()

    def end(self, code: int) -> None:
        """Send EXIT and disconnect (after the output already queued)."""
        transport = self.conn.writer.transport
        if transport.is_closing():
            return
        self.conn.write(FrameType.EXIT, encode_exit(code))
        if transport.get_write_buffer_size() > CLIENT_HIGH_WATER:
            transport.abort()  # it is not reading: do not wait on it to flush
        else:
            transport.close()


class Session:
    def __init__(
        self,
        session_id: str,
        cmd: Sequence[str],
        child: Child,
        master: int,
        *,
        user: str,
        idle_timeout: float | None,
        request: ProcessStart | None = None,
    ) -> None:
        self.id = session_id
        #: The PROC_START that started it detached (None for an EXEC_REQ).
        self.request = request
        self.cmd = tuple(cmd)
        self.argv = shlex.join(cmd)
        self.user = user
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.child = child
        #: The scrollback, also read by PROC_ATTACH readers (the process table).
        self.output = OutputLog(SCROLLBACK)
        self.client: Attachment | None = None
        self.exit_code: int | None = None
        self.done = asyncio.Event()
        self._master = master
        self._input = FdWriter(master, owns_fd=False)
        self._idle_timeout = idle_timeout
        self._idle_handle: asyncio.TimerHandle | None = None
        self._wakeup: asyncio.Future[None] | None = None
        child.on_exit(self._on_child_exit)

    @property
    def running(self) -> bool:
        return self.exit_code is None

    @property
    def pid(self) -> int:
        return self.child.pid

    def process_info(self) -> ProcessInfo:
        return ProcessInfo(
            pid=self.pid,
            cmd=self.cmd,
            running=self.running,
            started_at=self.created_at,
            exit_code=self.exit_code,
            finished_at=self.finished_at,
            tty=True,
            session_id=self.id,
            user=self.user,
            tag=None if self.request is None else self.request.tag,
            cwd=None if self.request is None else self.request.cwd,
            env={} if self.request is None else self.request.env,
        )

    @property
    def accepts_signals(self) -> bool:
        # Not after the leader is reaped: its pid (the group's id) may be reused.
        return self.running and not self.child.exited

    def signal(self, sig: int) -> None:
        self.child.kill_group(sig)

    def info(self) -> SessionInfo:
        return SessionInfo(
            session_id=self.id,
            argv=self.argv,
            tty=True,
            running=self.running,
            attached=self.client is not None,
            created_at=self.created_at,
            exit_code=self.exit_code,
        )

    # ---- output ------------------------------------------------------------------

    async def run(self) -> None:
        """Pump the pty until the session ends (owned by the registry)."""
        try:
            await self._relay_output()
            code = await self.child.wait()
        finally:
            await self._input.aclose()
            close_fd(self._master)
            self._master = -1
            self.disarm_idle()
        self.exit_code = code
        self.finished_at = time.time()
        self.output.end()
        client, self.client = self.client, None
        if client is not None:
            client.end(code)
        self.done.set()

    async def _relay_output(self) -> None:
        fd = self._master
        while True:
            try:
                data = os.read(fd, CHUNK_SIZE)
            except BlockingIOError:
                if self.child.exited:
                    # The leader is gone but something may still hold the pty (a
                    # background job): take what comes within a grace period.
                    if not await self._readable(EXIT_GRACE):
                        return
                else:
                    await self._readable(None)
                continue
            except OSError:
                return  # EIO: every slave fd is closed
            if not data:
                return
            self.output.append(FrameType.STDOUT, data)
            client = self.client
            if client is not None:
                await client.send_output(data)

    async def _readable(self, grace: float | None) -> bool:
        """Wait until the master is readable or the child exits; False on timeout."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._wakeup = fut
        loop.add_reader(self._master, wake, fut)
        try:
            await asyncio.wait_for(fut, grace)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._master)
            self._wakeup = None
        return True

    def _on_child_exit(self, _child: Child) -> None:
        if self._wakeup is not None:
            wake(self._wakeup)

    # ---- input -------------------------------------------------------------------

    async def write_input(self, data: bytes) -> None:
        if data and self.running:
            await self._input.put(data)

    async def close_input(self) -> None:
        """Ctrl-D: end-of-file for a program reading the terminal at the start of a line
        (in the middle of one it only pushes the line so far)."""
        await self.write_input(EOF_CHAR)

    def resize(self, rows: int, cols: int) -> bool:
        if self._master >= 0:
            with contextlib.suppress(OSError):  # the pty is going away
                _set_winsize(self._master, rows, cols)
        return True

    # ---- idle timer --------------------------------------------------------------

    def arm_idle(self) -> None:
        self.disarm_idle()
        if (
            self._idle_timeout
            and self.running
            and self.client is None
            and self.id != INIT_SESSION_ID  # the init script runs detached by design
        ):
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self._idle_timeout, self._idle_expired)

    def disarm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _idle_expired(self) -> None:
        self._idle_handle = None
        if self.client is None and self.running:
            log.info("session %s idle for %ss: killing it", self.id, self._idle_timeout)
            self.child.kill_group(signal.SIGKILL)


class SessionRegistry:
    """Every TTY session of the agent; owns their pump tasks."""

    def __init__(self, ctx: GuestContext, table: ProcessTable) -> None:
        self._ctx = ctx
        self._table = table
        self._sessions: dict[str, Session] = {}
        self._finished: deque[str] = deque()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise RequestError(f"no session {session_id!r}") from None

    def list(self) -> list[SessionInfo]:
        return [s.info() for s in self._sessions.values()]

    def counts(self) -> tuple[int, int]:
        """(attached, running) sessions."""
        attached = sum(1 for s in self._sessions.values() if s.client is not None)
        running = sum(1 for s in self._sessions.values() if s.running)
        return attached, running

    async def start(
        self,
        req: ExecRequest,
        *,
        session_id: str | None = None,
        request: ProcessStart | None = None,
    ) -> Session:
        """Start a command on a new pty. Raises OSError/SubprocessError if it cannot start."""
        ctx = self._ctx
        user = ctx.exec_user(req.user)
        env = ctx.exec_env(req.env, user, tty=True)
        cwd = ctx.exec_cwd(req.cwd, user)
        master, slave = os.openpty()
        try:
            _set_winsize(slave, req.rows or DEFAULT_ROWS, req.cols or DEFAULT_COLS)
            if ctx.credentials(user) is not None:
                os.fchown(slave, user.uid, -1)  # so it can open it, and reopen /dev/tty
            child = await ctx.start_on_terminal(req.cmd, user, slave=slave, cwd=cwd, env=env)
        except BaseException:
            close_fd(master)
            raise
        finally:
            close_fd(slave)
        os.set_blocking(master, False)
        sid = session_id if session_id is not None else f"s{next(self._ids)}"
        session = Session(
            sid,
            req.cmd,
            child,
            master,
            user=user.name,
            idle_timeout=ctx.settings.session_idle_timeout,
            request=request,
        )
        self._sessions[sid] = session
        self._table.add(session)
        task = asyncio.create_task(self._run(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return session

    async def _run(self, session: Session) -> None:
        await session.run()
        self._finished.append(session.id)
        limit = self._ctx.settings.max_finished_sessions
        while len(self._finished) > limit:
            old = self._finished.popleft()
            if old in self._sessions and not self._sessions[old].running:
                self._table.remove(self._sessions.pop(old))

    async def serve(self, conn: FrameStream, req: ExecRequest) -> None:
        """An EXEC_REQ with ``tty``: start a session, or attach to one."""
        if req.session_id is not None:
            session = self.get(req.session_id)
            if req.rows and req.cols:
                session.resize(req.rows, req.cols)
            await self._attach(session, conn, replay=True)
            return
        try:
            session = await self.start(req)
        except OSError as exc:
            await refuse_start(conn, *spawn_failure(exc, req.cmd[0], self._ctx.exec_cwd(req.cwd)))
            return
        except subprocess.SubprocessError as exc:
            await refuse_start(conn, EXIT_CANNOT_EXECUTE, f"kiln: cannot start a terminal: {exc}\n")
            return
        except ValueError as exc:
            raise RequestError(f"cannot start {req.cmd[0]!r}: {exc}") from exc
        await self._attach(session, conn, replay=False)

    async def start_detached(self, conn: FrameStream, req: ProcessStart) -> None:
        """PROC_START with ``tty``: a session nobody is attached to; PROC_INFO.

        No idle timer: like a background process it runs until it ends or is
        killed (readers come and go by pid)."""
        exec_req = ExecRequest(
            cmd=req.cmd,
            env=req.env,
            cwd=req.cwd,
            tty=True,
            rows=req.rows,
            cols=req.cols,
            user=req.user,
        )
        try:
            session = await self.start(exec_req, request=req)
        except OSError as exc:
            code, message = spawn_failure(exc, req.cmd[0], self._ctx.exec_cwd(req.cwd))
            status = ProcessStatus.error(Reason.CANNOT_START, message.strip(), code)
            await conn.send(FrameType.PROC_STATUS, status.to_payload())
            return
        except (subprocess.SubprocessError, ValueError) as exc:
            status = ProcessStatus.error(Reason.INVALID, f"cannot start {req.cmd[0]!r}: {exc}")
            await conn.send(FrameType.PROC_STATUS, status.to_payload())
            return
        self._ctx.touch()
        await conn.send(FrameType.PROC_INFO, session.process_info().to_payload())

    async def _attach(self, session: Session, conn: FrameStream, *, replay: bool) -> None:
        self._ctx.touch()
        attachment = Attachment(conn)
        if session.running:
            previous = session.client
            if previous is not None:
                previous.end(DETACHED_EXIT)
            session.client = attachment
            session.disarm_idle()
        # Header, scrollback and the switch to live output happen in one step of
        # the event loop: no output can fall between the snapshot and live frames.
        conn.write(FrameType.SESSION_INFO, session.info().to_payload())
        if replay:
            conn.write(FrameType.STDOUT, session.output.snapshot(FrameType.STDOUT))
        if not session.running:
            assert session.exit_code is not None
            await conn.send(FrameType.EXIT, encode_exit(session.exit_code))
            return
        try:
            await conn.writer.drain()
            await self._relay_input(session, conn)
        finally:
            if session.client is attachment:
                session.client = None
                session.arm_idle()

    async def _relay_input(self, session: Session, conn: FrameStream) -> None:
        while True:
            try:
                frame = await recv_frame(conn)
            except ConnectionError:
                return
            if frame is None:
                return  # host disconnected: detach
            ftype = frame.type
            if ftype == FrameType.STDIN:
                self._ctx.touch()
                await session.write_input(frame.payload)
            elif ftype == FrameType.RESIZE:
                session.resize(*decode_resize(frame.payload))
            elif ftype == FrameType.KILL:
                session.child.kill_group(signal.SIGTERM)
            else:
                raise RequestError(f"unexpected {FrameType(ftype).name} frame in a TTY session")

    async def kill(self, session_id: str) -> None:
        """EXEC_KILL: SIGKILL the session's group, wait for its end, forget it."""
        session = self.get(session_id)
        if session.running:
            session.child.kill_group(signal.SIGKILL)
            try:
                await asyncio.wait_for(session.done.wait(), KILL_WAIT)
            except TimeoutError:
                raise RequestError(f"session {session_id!r} did not end after SIGKILL") from None
        self._sessions.pop(session_id, None)
        self._table.remove(session)
        if session_id in self._finished:
            self._finished.remove(session_id)

    async def aclose(self) -> None:
        """Kill every running session and wait for the pumps (agent shutdown)."""
        for session in self._sessions.values():
            if session.running:
                session.child.kill_group(signal.SIGKILL)
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
