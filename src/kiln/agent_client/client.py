"""The host-side client of the guest agent.

:class:`AgentClient` holds no connection: the protocol is one operation per
connection, so every call dials, authenticates (AUTH rides in the same write as
the request), runs, and closes. A client is therefore cheap, stateless and
safe to share between tasks; concurrency is limited only by the agent.

The agent says nothing when AUTH succeeds; a wrong token gets an ERROR
instead of the first answer, which is raised as :class:`AuthError`. For
requests the agent answers at once (stat, ls, list, activity, attach,
forward, ...), ``auth_timeout`` bounds the wait for that first answer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from kiln.protocol import (
    ActivityInfo,
    ClockSet,
    ExecKillRequest,
    ExecRequest,
    FileInfo,
    FileListing,
    FileReadRequest,
    FileWriteRequest,
    ForwardRequest,
    Frame,
    FrameType,
    InvalidMessage,
    MkdirRequest,
    MkdirResponse,
    MoveRequest,
    PathRequest,
    ProcessAttach,
    ProcessInfo,
    ProcessInput,
    ProcessResize,
    ProcessSignal,
    ProcessStart,
    RemoveRequest,
    SessionInfo,
    StatusResponse,
    WatchRequest,
    decode_exit,
    encode_json,
    process_list_from_payload,
    session_list_from_payload,
)

from .errors import (
    AgentConnectError,
    AgentConnectionLost,
    AgentProtocolError,
    AgentTimeout,
    ForwardError,
    ProcessNotFound,
    RemoteError,
)
from .exec import ExecProcess, ExecResult, send_chunked
from .files import FileContent, FileReader, WriteSource, mode_string, send_content, source_size
from .forward import ForwardStream
from .processes import ProcessOutput, check_status, process_info
from .transport import Connection, Endpoint, dial, translate_errors
from .tty import TtySession
from .watch import DirWatch

#: What ``attach`` runs when neither a command nor a session id is given.
DEFAULT_SHELL: Final = ("/bin/bash", "-l")


@contextmanager
def _misuse() -> Iterator[None]:
    """A request the wire would reject is the caller's mistake: a ValueError."""
    try:
        yield
    except InvalidMessage as exc:
        raise ValueError(str(exc)) from None


def _argv(cmd: Sequence[str]) -> tuple[str, ...]:
    if isinstance(cmd, str):
        raise TypeError("cmd must be a sequence of arguments, e.g. ['sh', '-c', 'echo hi']")
    argv = tuple(cmd)
    if not argv:
        raise ValueError("cmd must not be empty")
    return argv


class AgentClient:
    """Client for one guest agent at ``endpoint``.

    ``connect_timeout`` bounds each dial; ``auth_timeout`` bounds the wait for
    the first answer to a request the agent answers immediately (which is also
    when a wrong token shows). ``None`` disables a timeout.
    """

    __slots__ = ("auth_timeout", "connect_timeout", "endpoint", "token")

    def __init__(
        self,
        endpoint: Endpoint,
        token: str | None = None,
        *,
        connect_timeout: float | None = 5.0,
        auth_timeout: float | None = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.token = token
        self.connect_timeout = connect_timeout
        self.auth_timeout = auth_timeout

    @classmethod
    def tcp(cls, host: str, token: str | None = None, **kwargs: float | None) -> AgentClient:
        """An agent in a VM at ``host`` (control port 1024, forward port 1025)."""
        return cls(Endpoint.tcp(host), token, **kwargs)

    @classmethod
    def unix_dir(
        cls, socket_dir: str | os.PathLike[str], token: str | None = None, **kwargs: float | None
    ) -> AgentClient:
        """A test-mode agent listening on ``control.sock``/``forward.sock`` in a directory."""
        return cls(Endpoint.unix_dir(socket_dir), token, **kwargs)

    def __repr__(self) -> str:
        return f"AgentClient({self.endpoint.description})"

    # -- connections --------------------------------------------------------------------

    async def _open(self) -> Connection:
        sock = await dial(self.endpoint.control, self.connect_timeout, self.endpoint.description)
        return Connection(sock, self.token)

    async def _open_forward(self) -> Connection:
        sock = await dial(self.endpoint.forward, self.connect_timeout, self.endpoint.description)
        return Connection(sock, self.token)

    async def _first_answer(self, conn: Connection, what: str) -> Frame:
        return await conn.first_answer(what, self.auth_timeout)

    async def _call(self, ftype: FrameType, payload: bytes, expect: FrameType) -> Frame:
        """One request, one answer of type ``expect``."""
        async with await self._open() as conn:
            await conn.send(ftype, payload)
            frame = await self._first_answer(conn, expect.name)
            if frame.type != expect:
                raise AgentProtocolError(
                    f"expected {expect.name}, got {FrameType(frame.type).name}"
                )
            return frame

    async def wait_ready(
        self,
        timeout: float = 30.0,  # noqa: ASYNC109 -- a deadline for the whole poll
        interval: float = 0.02,
    ) -> None:
        """Poll until the agent answers (e.g. while a VM boots); AgentTimeout otherwise.

        AuthError is raised at once: retrying will not fix a wrong token.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await self.activity()
                        return
                    except (AgentConnectError, AgentConnectionLost, AgentTimeout):
                        await asyncio.sleep(interval)
        except TimeoutError:
            raise AgentTimeout(f"{self.endpoint.description} not ready after {timeout} s") from None

    # -- exec ---------------------------------------------------------------------------

    def exec_stream(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> ExecProcess:
        """Start a piped command; use as ``async with client.exec_stream([...]) as proc``.

        With ``stdin`` given it is sent and closed; otherwise stdin stays open
        for :meth:`ExecProcess.send_stdin` until :meth:`ExecProcess.close_stdin`.
        ``timeout`` covers the whole run; on expiry the command is killed and
        :class:`AgentTimeout` raised.
        """
        with _misuse():
            request = ExecRequest(cmd=_argv(cmd), env=dict(env or {}), cwd=cwd, user=user)
        return ExecProcess(self._open, request, stdin, timeout)

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- kills the command on expiry
        user: str | None = None,
    ) -> ExecResult:
        """Run a command to completion and return its exit code and output.

        stdin is closed after ``stdin`` (or at once when None), like ``subprocess.run``.
        """
        proc = self.exec_stream(
            cmd, env=env, cwd=cwd, stdin=b"" if stdin is None else stdin, timeout=timeout, user=user
        )
        async with proc:
            return await proc.wait()

    # -- TTY sessions -------------------------------------------------------------------

    def attach(
        self,
        cmd: Sequence[str] | None = None,
        *,
        session_id: str | None = None,
        rows: int | None = None,
        cols: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> TtySession:
        """Start a TTY session running ``cmd`` (default: a login shell), or reattach
        to ``session_id``; use as ``async with client.attach(...) as tty``."""
        if cmd is not None and session_id is not None:
            raise ValueError("give either cmd (a new session) or session_id (reattach)")
        if session_id is None:
            argv = DEFAULT_SHELL if cmd is None else _argv(cmd)
            rows = 24 if rows is None else rows
            cols = 80 if cols is None else cols
        else:
            argv = ()
        with _misuse():
            request = ExecRequest(
                cmd=argv,
                env=dict(env or {}),
                cwd=cwd,
                tty=True,
                rows=rows,
                cols=cols,
                session_id=session_id,
                user=user,
            )
        return TtySession(self._open, request, self.auth_timeout)

    async def list_sessions(self) -> list[SessionInfo]:
        frame = await self._call(FrameType.EXEC_LIST_REQ, b"", FrameType.EXEC_LIST_RESP)
        with translate_errors("reading EXEC_LIST_RESP"):
            return session_list_from_payload(frame.payload)

    async def kill_session(self, session_id: str) -> None:
        """SIGKILL a session's process group (RemoteNotFound for an unknown id)."""
        payload = ExecKillRequest(session_id).to_payload()
        async with await self._open() as conn:
            await conn.send(FrameType.EXEC_KILL, payload)
            # The agent acknowledges with EXIT (or a status), or just closes.
            try:
                async with asyncio.timeout(self.auth_timeout):
                    frame = await conn.recv()
            except TimeoutError:
                raise AgentTimeout("the agent did not confirm EXEC_KILL") from None
            if frame is None:
                return
            conn.check_error(frame)
            if frame.type == FrameType.EXIT:
                with translate_errors("reading the EXEC_KILL answer"):
                    code = decode_exit(frame.payload)
                if code != 0:
                    raise RemoteError(f"killing session {session_id!r} failed ({code})")

    # -- background processes -------------------------------------------------------------

    async def start_process(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = True,
        tag: str | None = None,
        tty: bool = False,
        rows: int | None = None,
        cols: int | None = None,
    ) -> ProcessInfo:
        """Start a command detached from any connection; its table entry.

        ``stdin`` False: its stdin is at end-of-file from the start. ``tty``: on a
        terminal of ``rows`` x ``cols`` (a TTY session, output all stdout).
        CannotStart when it cannot be started (``exit_code`` 127/126 as an exec)."""
        with _misuse():
            payload = ProcessStart(
                _argv(cmd),
                dict(env or {}),
                cwd,
                user,
                stdin=stdin,
                tag=tag,
                tty=tty,
                rows=rows,
                cols=cols,
            ).to_payload()
        async with await self._open() as conn:
            await conn.send(FrameType.PROC_START, payload)
            return process_info(await self._first_answer(conn, "PROC_INFO"), None)

    async def list_processes(self) -> list[ProcessInfo]:
        """The agent's process table: background processes and TTY sessions,
        running and recently finished."""
        frame = await self._call(FrameType.PROC_LIST_REQ, b"", FrameType.PROC_LIST_RESP)
        with translate_errors("reading PROC_LIST_RESP"):
            return process_list_from_payload(frame.payload)

    async def get_process(self, pid: int) -> ProcessInfo:
        """One entry of the process table (ProcessNotFound if absent).

        From the listing, not a PROC_ATTACH: looking does not count as activity."""
        for info in await self.list_processes():
            if info.pid == pid:
                return info
        raise ProcessNotFound(f"no process {pid}", pid)

    def process_output(
        self, pid: int, *, replay: bool = True, follow: bool = True
    ) -> ProcessOutput:
        """Read a process's output: ``async with client.process_output(pid) as out``,
        then ``out.info`` and ``async for event in out`` (kept output when
        ``replay``, then live output while ``follow``, then Exit). Leaving only
        detaches."""
        with _misuse():
            request = ProcessAttach(pid, replay, follow)
        return ProcessOutput(self._open, request, self.auth_timeout)

    async def process_input(self, pid: int, data: bytes, *, close: bool = False) -> None:
        """Write to a process's stdin (and close it after, with ``close``).

        ProcessFinished once it has exited; ProcessNotFound for an unknown pid."""
        with _misuse():
            request = ProcessInput(pid, len(data), close)
        async with await self._open() as conn:
            await conn.send(FrameType.PROC_INPUT, request.to_payload())
            await send_chunked(conn, FrameType.STDIN, data)
            frame = await conn.recv_answer("PROC_STATUS")
            if frame.type != FrameType.PROC_STATUS:
                raise AgentProtocolError(f"expected PROC_STATUS, got {FrameType(frame.type).name}")
            check_status(frame, pid)

    async def signal_process(self, pid: int, signal: str) -> None:
        """Send ``signal`` ("TERM", "KILL", ... or "SIGTERM") to the process's group.

        ValueError for an unknown signal name; ProcessFinished once it has exited."""
        with _misuse():
            payload = ProcessSignal(pid, signal).to_payload()
        frame = await self._call(FrameType.PROC_SIGNAL, payload, FrameType.PROC_STATUS)
        check_status(frame, pid)

    async def resize_process(self, pid: int, rows: int, cols: int) -> None:
        """Set the terminal size of a process started with ``tty``.

        NoTerminal for a piped one; ProcessFinished once it has exited."""
        with _misuse():
            payload = ProcessResize(pid, rows, cols).to_payload()
        frame = await self._call(FrameType.PROC_RESIZE, payload, FrameType.PROC_STATUS)
        check_status(frame, pid)

    # -- small requests -----------------------------------------------------------------

    async def activity(self) -> ActivityInfo:
        frame = await self._call(FrameType.ACTIVITY_REQ, b"", FrameType.ACTIVITY_RESP)
        with translate_errors("reading ACTIVITY_RESP"):
            return ActivityInfo.from_payload(frame.payload)

    async def set_clock(self, unix_ns: int | None = None, *, seed: bytes | None = None) -> None:
        """Set the guest's wall clock (default: the host's now).

        ``seed``, host randomness, is mixed into the guest's RNG (sent after a
        restore, so clones of one snapshot do not share RNG state).
        """
        if unix_ns is None:
            unix_ns = time.time_ns()
        if unix_ns < 0:
            raise ValueError(f"unix_ns must not be negative, got {unix_ns}")
        payload = ClockSet(unix_ns, seed).to_payload()
        frame = await self._call(FrameType.CLOCK_SET, payload, FrameType.CLOCK_SET_RESP)
        _check_status(frame, "setting the clock")

    async def configure(self, config: Mapping[str, Any]) -> None:
        """CONFIGURE: apply a config.json (:mod:`kiln.guest.config`) to the running agent.

        What is present changes (clock and seed, hostname, files, env, token; ``init``
        starts); a new ``token`` holds for every later connection. RemoteError if the
        guest refused or could not apply it.
        """
        payload = encode_json(dict(config))
        frame = await self._call(FrameType.CONFIGURE, payload, FrameType.CONFIGURE_RESP)
        _check_status(frame, "configuring the agent")

    # -- files --------------------------------------------------------------------------

    def read_file_stream(
        self,
        path: str,
        *,
        offset: int = 0,
        limit: int = 0,
        max_bytes: int = 0,
        user: str | None = None,
    ) -> FileReader:
        """Stream a file: ``async with client.read_file_stream(p) as f`` then
        ``f.size``/``f.mode`` and ``async for chunk in f``.

        ``offset`` is a 1-based first line, ``limit`` a line count, ``max_bytes``
        a byte cap (0: none); the agent stops at whichever comes first.
        """
        if min(offset, limit, max_bytes) < 0:
            raise ValueError("offset, limit and max_bytes must not be negative")
        with _misuse():
            request = FileReadRequest(
                path, offset=offset, limit=limit, max_bytes=max_bytes, user=user
            )
        return FileReader(self._open, request, self.auth_timeout)

    async def read_file(
        self,
        path: str,
        *,
        offset: int = 0,
        limit: int = 0,
        max_bytes: int = 0,
        user: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- kills the operation on expiry
    ) -> FileContent:
        """Read a file (or part of it, see :meth:`read_file_stream`) into memory."""
        try:
            async with asyncio.timeout(timeout):
                reader = self.read_file_stream(
                    path, offset=offset, limit=limit, max_bytes=max_bytes, user=user
                )
                async with reader:
                    data = await reader.read_all()
        except TimeoutError:
            raise AgentTimeout(f"reading {path} took longer than {timeout} s") from None
        return FileContent(data, reader.size, reader.mode, len(data) < reader.size)

    async def write_file(
        self,
        path: str,
        data: WriteSource,
        *,
        mode: int | str | None = None,
        size: int | None = None,
        user: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- kills the operation on expiry
    ) -> None:
        """Write a file atomically (the agent renames a complete temporary file).

        ``data`` is bytes, a local file (``pathlib.Path``) streamed from disk, or
        an async iterable of bytes (then ``size`` is required). ``mode`` is an
        int (``0o644``) or an octal string. Parent directories are created.
        ``user``: as that user (their permissions; what is created is theirs).
        """
        total = source_size(data, size)
        with _misuse():
            request = FileWriteRequest(path, total, mode_string(mode), user)
        try:
            async with asyncio.timeout(timeout):
                await self._write_file(request, data)
        except TimeoutError:
            raise AgentTimeout(f"writing {path} took longer than {timeout} s") from None

    async def _write_file(self, request: FileWriteRequest, data: WriteSource) -> None:
        async with await self._open() as conn:
            # If the agent refused early (bad token, bad path) and closed, sending
            # stops and its ERROR, read next, tells why.
            await send_content(conn, request, data)
            frame = await conn.recv_answer("FILE_WRITE_RESP")
            if frame.type != FrameType.FILE_WRITE_RESP:
                raise AgentProtocolError(
                    f"expected FILE_WRITE_RESP, got {FrameType(frame.type).name}"
                )
            _check_status(frame, f"writing {request.path}")

    async def stat(self, path: str, *, user: str | None = None, details: bool = False) -> FileInfo:
        """FileInfo of a path (RemoteNotFound when it does not exist).

        ``user``: as that user (their permissions; relative paths from their
        home). ``details``: with type, owner, group, permissions, symlink target.
        """
        with _misuse():
            payload = PathRequest(path, user=user, details=details).to_payload()
        frame = await self._call(FrameType.FILE_STAT_REQ, payload, FrameType.FILE_STAT_RESP)
        with translate_errors("reading FILE_STAT_RESP"):
            return FileInfo.from_payload(frame.payload)

    async def ls(
        self,
        path: str,
        *,
        depth: int | None = None,
        user: str | None = None,
        details: bool = False,
    ) -> FileListing:
        """A directory's entries sorted by name (capped; see ``FileListing.truncated``).

        ``depth`` 2 and more also lists subdirectories (entries then carry ``path``).
        """
        with _misuse():
            payload = PathRequest(path, user=user, depth=depth, details=details).to_payload()
        frame = await self._call(FrameType.FILE_LS_REQ, payload, FrameType.FILE_LS_RESP)
        with translate_errors("reading FILE_LS_RESP"):
            return FileListing.from_payload(frame.payload)

    async def mkdir(
        self,
        path: str,
        *,
        parents: bool = True,
        mode: int | str | None = None,
        user: str | None = None,
    ) -> MkdirResponse:
        """Create a directory (with ``parents``, missing parents too). An existing
        directory is fine: the answer's ``created`` is then False."""
        with _misuse():
            payload = MkdirRequest(path, parents, mode_string(mode), user).to_payload()
        frame = await self._call(FrameType.FILE_MKDIR_REQ, payload, FrameType.FILE_MKDIR_RESP)
        with translate_errors("reading FILE_MKDIR_RESP"):
            return MkdirResponse.from_payload(frame.payload)

    async def move(
        self, source: str, destination: str, *, overwrite: bool = False, user: str | None = None
    ) -> FileInfo:
        """Rename ``source`` to ``destination``: RemoteExists if it exists, unless
        ``overwrite``. Returns the destination's FileInfo (with ``path``)."""
        with _misuse():
            payload = MoveRequest(source, destination, overwrite, user).to_payload()
        frame = await self._call(FrameType.FILE_MOVE_REQ, payload, FrameType.FILE_MOVE_RESP)
        with translate_errors("reading FILE_MOVE_RESP"):
            return FileInfo.from_payload(frame.payload)

    async def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        """Remove a file, symlink or empty directory; ``recursive``: any directory tree."""
        with _misuse():
            payload = RemoveRequest(path, recursive, user).to_payload()
        frame = await self._call(FrameType.FILE_REMOVE_REQ, payload, FrameType.FILE_REMOVE_RESP)
        _check_status(frame, f"removing {path}")

    def watch_dir(self, path: str, *, recursive: bool = False, user: str | None = None) -> DirWatch:
        """Watch a directory: ``async with client.watch_dir(p) as w: async for ev in w``."""
        with _misuse():
            request = WatchRequest(path, recursive, user)
        return DirWatch(self._open, request, self.auth_timeout)

    # -- port forwarding ----------------------------------------------------------------

    async def forward(self, port: int) -> ForwardStream:
        """Open a raw byte stream to ``127.0.0.1:port`` inside the sandbox.

        ForwardError when the agent cannot connect there. Close the stream
        (``aclose`` or ``async with``) when done.
        """
        sock, leftover = await self.forward_socket(port)
        return await ForwardStream.over(sock, leftover)

    async def forward_socket(self, port: int) -> tuple[socket.socket, bytes]:
        """Like :meth:`forward`, but the bare non-blocking socket (the caller owns it)
        and the bytes the service already sent, for relays with their own I/O loop."""
        with _misuse():
            payload = ForwardRequest(port).to_payload()
        conn = await self._open_forward()
        try:
            await conn.send(FrameType.FWD_REQ, payload)
            frame = await self._first_answer(conn, "FWD_RESP")
            if frame.type != FrameType.FWD_RESP:
                raise AgentProtocolError(f"expected FWD_RESP, got {FrameType(frame.type).name}")
            with translate_errors("reading FWD_RESP"):
                status = StatusResponse.from_payload(frame.payload)
            if not status.ok:
                raise ForwardError(status.message or f"cannot forward to port {port}")
            sock, leftover = conn.detach()
        except BaseException:
            conn.close()
            raise
        sock.setblocking(False)
        return sock, leftover


def _check_status(frame: Frame, what: str) -> None:
    with translate_errors(f"reading the answer to {what}"):
        status = StatusResponse.from_payload(frame.payload)
    if not status.ok:
        raise RemoteError(status.message or f"{what} failed")
