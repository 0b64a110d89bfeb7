"""The process table: everything that outlives a connection, keyed by guest pid.

Two kinds of entries share it: background processes (piped, started by
PROC_START, detached from every connection) and TTY sessions (which keep their
ids, see :mod:`.sessions`). Each has an :class:`OutputLog` any number of readers
attach to (PROC_ATTACH: what is kept, then live output, then EXIT), takes input
(PROC_INPUT) and signals to its process group (PROC_SIGNAL) by pid.

A background process:

- gets stdin, stdout and stderr pipes; the agent keeps stdin open (for
  PROC_INPUT) and pumps both outputs into its log until they reach EOF, even
  after it exited (a daemon it left behind may still write there: closing the
  pipe would kill it with SIGPIPE);
- is finished when its own process exits: readers then get what is left and
  EXIT once the outputs are at EOF or, if something it left behind holds them,
  after :data:`EXIT_GRACE`;
- stays listed when finished, with its exit code and times, until more than
  ``max_finished`` finished entries push it out (oldest first); only the
  :data:`FINISHED_WITH_OUTPUT` most recent finished ones keep their output, so
  the agent's memory stays bounded whatever the processes print;
- takes signals to its process group while it runs and while something it
  left behind still holds its pipes (that group still exists then);
- takes input (PROC_INPUT) written straight into its stdin pipe: "ok" means
  the bytes are in the pipe; a process that exits before reading them gets
  FINISHED instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from kiln.protocol import (
    CHUNK_SIZE,
    FrameStream,
    FrameType,
    ProcessAttach,
    ProcessInfo,
    ProcessInput,
    ProcessResize,
    ProcessSignal,
    ProcessStart,
    ProcessStatus,
    ProtocolError,
    Reason,
    encode_exit,
    process_list_to_payload,
)

from .context import GuestContext, recv_frame
from .errors import RequestError
from .execution import spawn_failure, start_piped
from .fdio import close_fd, read_chunks, wake
from .output import OutputLog
from .process import Child

log = logging.getLogger(__name__)

#: After a background process exits, how long readers wait for output still
#: coming from what it left behind before they get EXIT.
EXIT_GRACE = 0.2
#: Finished background processes kept listed (oldest evicted first).
MAX_FINISHED = 64
#: Of those, how many keep their output (up to 2 x OUTPUT_KEPT each).
FINISHED_WITH_OUTPUT = 16
#: A reader's unsent output above which it waits for the host (flow control).
READER_HIGH_WATER = 1 << 20


class Entry(Protocol):
    """What the table needs of a background process or a TTY session."""

    @property
    def pid(self) -> int: ...

    @property
    def running(self) -> bool: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def output(self) -> OutputLog: ...

    @property
    def accepts_signals(self) -> bool: ...

    def process_info(self) -> ProcessInfo: ...

    async def write_input(self, data: bytes) -> None: ...

    async def close_input(self) -> None: ...

    def signal(self, sig: int) -> None: ...

    def resize(self, rows: int, cols: int) -> bool:
        """Set its terminal's size; False if it has no terminal."""
        ...


class BackgroundProcess:
    """A piped command detached from every connection."""

    def __init__(
        self,
        child: Child,
        cmd: Sequence[str],
        user: str,
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        request: ProcessStart | None = None,
    ) -> None:
        self.child = child
        self.cmd = tuple(cmd)
        self.user = user
        #: What it was started with (its tag, env and cwd are listed with it).
        self.request = request
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.exit_code: int | None = None
        self.output = OutputLog()
        self._stdin = stdin
        self._input_lock = asyncio.Lock()
        self._exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fds = (stdout, stderr)
        self._pumps: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def running(self) -> bool:
        return self.exit_code is None

    def process_info(self) -> ProcessInfo:
        req = self.request
        return ProcessInfo(
            pid=self.pid,
            cmd=self.cmd,
            running=self.running,
            started_at=self.started_at,
            exit_code=self.exit_code,
            finished_at=self.finished_at,
            user=self.user,
            tag=None if req is None else req.tag,
            cwd=None if req is None else req.cwd,
            env={} if req is None else req.env,
        )

    def start_pumps(self) -> None:
        self._pumps = [
            asyncio.create_task(self._pump(fd, stream))
            for fd, stream in zip(self._fds, (FrameType.STDOUT, FrameType.STDERR), strict=True)
        ]

    async def finish(self) -> None:
        """Until the process has exited and its readers have been told (EXIT)."""
        try:
            self.exit_code = await self.child.wait()
            self.finished_at = time.time()
            self._exited.set_result(None)
            self._close_stdin()
            # Output still in the pipes comes first; something the process left
            # behind may hold them open for longer: readers do not wait for that.
            await asyncio.wait(self._pumps, timeout=EXIT_GRACE)
        finally:
            self.output.end()

    async def drain(self) -> None:
        """Until both outputs reach EOF (all of it kept in the log)."""
        await asyncio.wait(self._pumps)

    async def close(self) -> None:
        """Stop pumping and close our ends of its pipes."""
        for task in self._pumps:
            task.cancel()
        if self._pumps:
            await asyncio.wait(self._pumps)
        for fd in self._fds:
            close_fd(fd)
        self._close_stdin()
        self.output.end()

    async def _pump(self, fd: int, stream: int) -> None:
        append = self.output.append
        async for data in read_chunks(fd):
            append(stream, data)

    @property
    def accepts_signals(self) -> bool:
        # After its exit its group lives on while something it left holds the pipes.
        return self.running or not all(task.done() for task in self._pumps)

    async def write_input(self, data: bytes) -> None:
        """Write ``data`` into its stdin; ProcessGone if it exits (or closes stdin) first."""
        async with self._input_lock:  # one request at a time: inputs never interleave
            view = memoryview(data)
            while view:
                fd = self._stdin  # again each time: the process may have exited meanwhile
                if fd < 0:
                    raise ProcessGone("its stdin is closed")
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await self._writable_or_exit(fd)
                except OSError as exc:  # EPIPE: nobody reads it any more
                    raise ProcessGone(f"its stdin is closed ({exc.strerror})") from None

    async def _writable_or_exit(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        writable: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, wake, writable)
        try:
            await asyncio.wait((writable, self._exited), return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_writer(fd)
            writable.cancel()
        if not writable.done() or writable.cancelled():
            raise ProcessGone("it exited before reading its input")

    async def close_input(self) -> None:
        async with self._input_lock:
            self._close_stdin()

    def _close_stdin(self) -> None:
        fd, self._stdin = self._stdin, -1
        if fd >= 0:
            close_fd(fd)

    def signal(self, sig: int) -> None:
        self.child.kill_group(sig)

    def resize(self, rows: int, cols: int) -> bool:
        return False  # pipes, no terminal


class ProcessGone(Exception):
    """Input for a process that has exited or closed its stdin."""


class ProcessTable:
    """Every background process and TTY session of the agent, by pid."""

    def __init__(self, ctx: GuestContext, max_finished: int = MAX_FINISHED) -> None:
        self._ctx = ctx
        self._entries: dict[int, Entry] = {}
        self._finished: deque[BackgroundProcess] = deque()
        self._max_finished = max_finished
        self._tasks: set[asyncio.Task[None]] = set()
        #: Background processes whose pipes are still open (listed or not).
        self._pumping: set[BackgroundProcess] = set()
        #: Connections reading some entry's output now.
        self.readers = 0

    # ---- membership --------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Register an entry; a finished one with a recycled pid gives way."""
        old = self._entries.get(entry.pid)
        if isinstance(old, BackgroundProcess) and old in self._finished:
            self._finished.remove(old)
        self._entries[entry.pid] = entry

    def remove(self, entry: Entry) -> None:
        if self._entries.get(entry.pid) is entry:
            del self._entries[entry.pid]

    def get(self, pid: int) -> Entry | None:
        return self._entries.get(pid)

    def list(self) -> list[ProcessInfo]:
        return [entry.process_info() for entry in self._entries.values()]

    def running_background(self) -> int:
        """Background processes that run now (ACTIVITY counts them as running)."""
        return sum(
            1 for e in self._entries.values() if isinstance(e, BackgroundProcess) and e.running
        )

    # ---- requests ----------------------------------------------------------------

    async def start(self, conn: FrameStream, req: ProcessStart) -> None:
        ctx = self._ctx
        user = ctx.exec_user(req.user)
        env = ctx.exec_env(req.env, user, tty=False)
        cwd = ctx.exec_cwd(req.cwd, user)
        ctx.touch()
        try:
            child, stdin, stdout, stderr = await start_piped(ctx, req.cmd, user, cwd=cwd, env=env)
        except OSError as exc:
            code, message = spawn_failure(exc, req.cmd[0], cwd)
            status = ProcessStatus.error(Reason.CANNOT_START, message.strip(), code)
            await conn.send(FrameType.PROC_STATUS, status.to_payload())
            return
        except ValueError as exc:
            status = ProcessStatus.error(Reason.INVALID, f"cannot start {req.cmd[0]!r}: {exc}")
            await conn.send(FrameType.PROC_STATUS, status.to_payload())
            return
        process = BackgroundProcess(
            child, req.cmd, user.name, stdin=stdin, stdout=stdout, stderr=stderr, request=req
        )
        if not req.stdin:
            await process.close_input()  # end-of-file before it can read anything
        self.add(process)
        task = asyncio.create_task(self._run(process))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.debug("background process %d started: %s", process.pid, req.cmd)
        await conn.send(FrameType.PROC_INFO, process.process_info().to_payload())

    async def _run(self, process: BackgroundProcess) -> None:
        process.start_pumps()
        self._pumping.add(process)
        try:
            await process.finish()
            self._finished.append(process)
            if len(self._finished) > FINISHED_WITH_OUTPUT:
                self._finished[-FINISHED_WITH_OUTPUT - 1].output.discard()
            while len(self._finished) > self._max_finished:
                self.remove(self._finished.popleft())
            await process.drain()
        finally:
            self._pumping.discard(process)
            await process.close()

    async def send_list(self, conn: FrameStream) -> None:
        await conn.send(FrameType.PROC_LIST_RESP, process_list_to_payload(self.list()))

    async def attach(self, conn: FrameStream, req: ProcessAttach) -> None:
        """PROC_ATTACH: PROC_INFO, then the output (kept, then live), then EXIT."""
        entry = await self._lookup(conn, req.pid)
        if entry is None:
            return
        self._ctx.touch()
        output = entry.output
        cursor = output.cursor(replay=req.replay)
        conn.write(FrameType.PROC_INFO, entry.process_info().to_payload())
        host = asyncio.create_task(_until_host_leaves(conn))
        self.readers += 1
        try:
            while True:
                # Both before reading: what comes after is for the next turn.
                wakeup = output.waiter()
                ended = output.ended
                for stream, data in output.read(cursor):
                    for start in range(0, len(data), CHUNK_SIZE):
                        conn.write(stream, data[start : start + CHUNK_SIZE])
                        if conn.writer.transport.get_write_buffer_size() > READER_HIGH_WATER:
                            await conn.writer.drain()
                if ended:
                    code = entry.exit_code
                    await conn.send(FrameType.EXIT, encode_exit(-1 if code is None else code))
                    return
                if not req.follow:  # what is kept, and the mark that this is all
                    await conn.send(FrameType.PROC_STATUS, ProcessStatus().to_payload())
                    return
                await conn.writer.drain()
                if not wakeup.done():
                    await asyncio.wait((wakeup, host), return_when=asyncio.FIRST_COMPLETED)
                if host.done():
                    return  # the reader left; the process goes on
        finally:
            self.readers -= 1
            host.cancel()
            await asyncio.wait((host,))

    async def write_input(self, conn: FrameStream, req: ProcessInput) -> None:
        """PROC_INPUT: ``size`` bytes of STDIN frames for the process, then PROC_STATUS."""
        entry = self.get(req.pid)
        data = bytearray()
        while len(data) < req.size:
            frame = await recv_frame(conn)
            if frame is None:
                return  # the host left before sending it all: nothing is written
            if frame.type != FrameType.STDIN:
                raise RequestError(f"expected STDIN, got {FrameType(frame.type).name}")
            data += frame.payload
        if len(data) != req.size:
            raise RequestError(f"got {len(data)} bytes of input, announced {req.size}")
        status = self._refusal(entry, req.pid, entry is not None and entry.running)
        if entry is not None and status is None:
            self._ctx.touch()
            try:
                if data:
                    await entry.write_input(bytes(data))
                if req.close:
                    await entry.close_input()
            except ProcessGone as exc:
                status = ProcessStatus.error(Reason.FINISHED, f"process {req.pid}: {exc}")
        await conn.send(FrameType.PROC_STATUS, (status or ProcessStatus()).to_payload())

    async def send_signal(self, conn: FrameStream, req: ProcessSignal) -> None:
        entry = self.get(req.pid)
        status = self._refusal(entry, req.pid, entry is not None and entry.accepts_signals)
        if entry is not None and status is None:
            self._ctx.touch()
            entry.signal(signal.Signals[f"SIG{req.signal}"])
        await conn.send(FrameType.PROC_STATUS, (status or ProcessStatus()).to_payload())

    async def resize(self, conn: FrameStream, req: ProcessResize) -> None:
        """PROC_RESIZE: a new size for a process's terminal, then PROC_STATUS."""
        entry = self.get(req.pid)
        status = self._refusal(entry, req.pid, entry is not None and entry.running)
        if entry is not None and status is None and not entry.resize(req.rows, req.cols):
            status = ProcessStatus.error(
                Reason.NO_TERMINAL, f"process {req.pid} has no terminal to resize"
            )
        await conn.send(FrameType.PROC_STATUS, (status or ProcessStatus()).to_payload())

    @staticmethod
    def _refusal(entry: Entry | None, pid: int, acceptable: bool) -> ProcessStatus | None:
        if entry is None:
            return ProcessStatus.error(Reason.NOT_FOUND, f"no process {pid}")
        if not acceptable:
            return ProcessStatus.error(
                Reason.FINISHED, f"process {pid} has exited with {entry.exit_code}"
            )
        return None

    async def _lookup(self, conn: FrameStream, pid: int) -> Entry | None:
        entry = self.get(pid)
        if entry is None:
            status = ProcessStatus.error(Reason.NOT_FOUND, f"no process {pid}")
            await conn.send(FrameType.PROC_STATUS, status.to_payload())
        return entry

    async def aclose(self) -> None:
        """Kill every background process's group and wait for them (agent shutdown),
        those that still run and those whose leftovers still hold their pipes."""
        for process in self._pumping:
            process.signal(signal.SIGKILL)
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)


async def _until_host_leaves(conn: FrameStream) -> None:
    """Read (and ignore) what the host sends until it closes the connection
    (or breaks the protocol: this reader is over either way)."""
    with contextlib.suppress(ConnectionError, ProtocolError):
        while await recv_frame(conn) is not None:
            pass
