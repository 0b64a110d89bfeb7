"""Piped exec (``tty`` false): a command with stdin/stdout/stderr pipes.

Flow of one exec connection::

    spawn (own process group) ─┬─ pump stdout → STDOUT frames ─┐
                               ├─ pump stderr → STDERR frames ─┼─ both EOF, child reaped,
                               │                               │  sync() → EXIT
    host frames ───────────────┴─ STDIN → child stdin, KILL → SIGKILL group
    host gone / protocol error ──→ SIGKILL group, stop
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import Mapping, Sequence

from kiln.protocol import (
    ExecRequest,
    FrameStream,
    FrameType,
    encode_exit,
)

from .context import GuestContext, UserInfo, recv_frame
from .errors import RequestError
from .fdio import FdWriter, close_fd, read_chunks
from .process import Child

EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126


def spawn_failure(exc: OSError, argv0: str, cwd: str) -> tuple[int, str]:
    """Exit code and STDERR message for a command that could not be started."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.filename == cwd and exc.filename != argv0:
        return EXIT_CANNOT_EXECUTE, f"kiln: cannot change directory to {cwd}: {reason}\n"
    if exc.errno == errno.ENOENT:
        return EXIT_NOT_FOUND, f"kiln: {argv0}: command not found\n"
    return EXIT_CANNOT_EXECUTE, f"kiln: {argv0}: cannot execute: {reason}\n"


async def refuse_start(conn: FrameStream, code: int, message: str) -> None:
    conn.write(FrameType.STDERR, message.encode("utf-8", "replace"))
    await conn.send(FrameType.EXIT, encode_exit(code))


async def start_piped(
    ctx: GuestContext,
    cmd: Sequence[str],
    user: UserInfo,
    *,
    cwd: str,
    env: Mapping[str, str],
) -> tuple[Child, int, int, int]:
    """Start ``cmd`` in its own process group on fresh pipes.

    Returns the child and our ends of its stdin, stdout and stderr (raw
    non-blocking fds, ours to close). Raises OSError (cannot start: see
    :func:`spawn_failure`), ValueError (bad arguments), RequestError.
    """
    fds: list[int] = []
    try:
        for _ in range(3):
            fds.extend(os.pipe2(os.O_CLOEXEC))
    except OSError as exc:
        for fd in fds:
            close_fd(fd)
        raise RequestError(f"cannot create pipes: {exc.strerror}") from exc
    in_r, in_w, out_r, out_w, err_r, err_w = fds
    try:
        child = await ctx.start_command(
            cmd, user, stdin=in_r, stdout=out_w, stderr=err_w, cwd=cwd, env=env
        )
    except BaseException:  # cannot start, or cancelled while a spawner starts it
        for fd in (in_w, out_r, err_r):
            close_fd(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            close_fd(fd)
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    return child, in_w, out_r, err_r


async def run_piped(conn: FrameStream, req: ExecRequest, ctx: GuestContext) -> None:
    user = ctx.exec_user(req.user)
    env = ctx.exec_env(req.env, user, tty=False)
    cwd = ctx.exec_cwd(req.cwd, user)
    ctx.touch()
    try:
        child, stdin, stdout, stderr = await start_piped(ctx, req.cmd, user, cwd=cwd, env=env)
    except OSError as exc:
        await refuse_start(conn, *spawn_failure(exc, req.cmd[0], cwd))
        return
    except ValueError as exc:  # NUL byte in an argument, '=' in an env name, ...
        raise RequestError(f"cannot start {req.cmd[0]!r}: {exc}") from exc
    ctx.running_execs.add(child)
    try:
        await PipedExec(conn, child, ctx, stdin=stdin, stdout=stdout, stderr=stderr).run()
    finally:
        ctx.running_execs.discard(child)


class PipedExec:
    """One running piped exec and its connection."""

    def __init__(
        self,
        conn: FrameStream,
        child: Child,
        ctx: GuestContext,
        *,
        stdin: int,
        stdout: int,
        stderr: int,
    ) -> None:
        self._conn = conn
        self._child = child
        self._ctx = ctx
        self._stdin = FdWriter(stdin, owns_fd=True)
        self._stdout = stdout
        self._stderr = stderr

    async def run(self) -> None:
        host = asyncio.create_task(self._read_host())
        work = asyncio.create_task(self._outputs_then_exit_code())
        try:
            await asyncio.wait((host, work), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Reached on normal completion, on host loss, and on our own cancellation.
            host.cancel()
            if not work.done() or work.cancelled() or work.exception() is not None:
                # The host left (or the agent stops): the whole group dies.
                self._child.kill_group(signal.SIGKILL)
                work.cancel()
            await asyncio.wait((host, work))
            await self._stdin.aclose()
            close_fd(self._stdout)
            close_fd(self._stderr)
        host_exc = None if host.cancelled() else host.exception()
        work_exc = None if work.cancelled() else work.exception()
        if not work.cancelled() and work_exc is None:
            await self._conn.send(FrameType.EXIT, encode_exit(work.result()))
            return
        # The host is gone or misbehaved; the group has been killed.
        for exc in (host_exc, work_exc):
            if exc is not None and not isinstance(exc, ConnectionError):
                raise exc  # RequestError/ProtocolError: the connection handler answers ERROR

    async def _outputs_then_exit_code(self) -> int:
        await asyncio.gather(
            self._pump(self._stdout, FrameType.STDOUT), self._pump(self._stderr, FrameType.STDERR)
        )
        code = await self._child.wait()
        if self._ctx.settings.durable:
            # Whatever the command wrote is on the disk before the host sees EXIT.
            await self._ctx.syncer.sync()
        return code

    async def _pump(self, fd: int, ftype: FrameType) -> None:
        conn = self._conn
        async for data in read_chunks(fd):
            conn.write(ftype, data)
            await conn.writer.drain()

    async def _read_host(self) -> None:
        """Host frames until the host goes away (returns) or misbehaves (raises)."""
        conn = self._conn
        while True:
            try:
                frame = await recv_frame(conn)
            except ConnectionError:
                return
            if frame is None:
                return
            ftype = frame.type
            if ftype == FrameType.STDIN:
                self._ctx.touch()
                await self._stdin.put(frame.payload)
            elif ftype == FrameType.KILL:
                self._child.kill_group(signal.SIGKILL)
            elif ftype != FrameType.RESIZE:  # no terminal to resize: RESIZE is ignored
                raise RequestError(f"unexpected {FrameType(ftype).name} frame during exec")
