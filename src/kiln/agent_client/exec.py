"""Piped command execution: the buffered result and the streaming process handle."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self, TypeVar

from kiln.protocol import CHUNK_SIZE, ExecRequest, FrameType, decode_exit

from .errors import AgentProtocolError, AgentTimeout
from .transport import Connection, translate_errors

T = TypeVar("T")

#: stdin up to this size goes out in the same write as the request; more is fed
#: by a task while the output is read (so a command echoing it cannot deadlock).
INLINE_STDIN: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A finished command. ``exit_code`` is 128+N when killed by signal N."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class Stdout:
    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    data: bytes


@dataclass(frozen=True, slots=True)
class Exit:
    code: int


ExecEvent = Stdout | Stderr | Exit


def chunks(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """``data`` in slices of at most CHUNK_SIZE bytes (none for empty data)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK_SIZE):
        yield view[start : start + CHUNK_SIZE]


async def send_chunked(conn: Connection, ftype: int, data: bytes | bytearray | memoryview) -> None:
    """Send ``data`` as frames of at most CHUNK_SIZE bytes, each waiting for room."""
    for chunk in chunks(data):
        if not await conn.send(ftype, chunk):
            return  # the connection is gone; the read side reports how it ended


class ExecProcess:
    """A command running in the sandbox with piped stdio, as an async context manager.

    Iterate it for :class:`Stdout`, :class:`Stderr` and finally :class:`Exit`
    events. Leaving the ``async with`` block before the Exit (an exception, a
    ``break``, a cancellation) closes the connection, and the agent then
    SIGKILLs the command's process group.

        async with client.exec_stream(["make", "test"]) as proc:
            async for event in proc:
                ...
    """

    __slots__ = (
        "_conn",
        "_deadline",
        "_exit_code",
        "_feeder",
        "_opener",
        "_request",
        "_stdin",
        "_timeout",
    )

    def __init__(
        self,
        opener: Callable[[], Awaitable[Connection]],
        request: ExecRequest,
        stdin: bytes | None,
        timeout: float | None,
    ) -> None:
        self._opener = opener
        self._request = request
        self._stdin = stdin
        self._timeout = timeout
        self._deadline: float | None = None
        self._conn: Connection | None = None
        self._exit_code: int | None = None
        self._feeder: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        if self._timeout is not None:
            self._deadline = asyncio.get_running_loop().time() + self._timeout
        conn = await self._within_deadline(self._opener())
        self._conn = conn
        try:
            frames: list[tuple[int, bytes | memoryview]] = [
                (FrameType.EXEC_REQ, self._request.to_payload())
            ]
            stdin = self._stdin
            if stdin is not None and len(stdin) <= INLINE_STDIN:
                frames.extend((FrameType.STDIN, chunk) for chunk in chunks(stdin))
                frames.append((FrameType.STDIN, b""))
                stdin = None
            await self._within_deadline(conn.send_frames(frames))
            if stdin is not None:
                self._feeder = asyncio.create_task(self._feed(conn, stdin))
        except BaseException:
            await self._stop_feeder()
            conn.close()
            raise
        return self

    async def _feed(self, conn: Connection, data: bytes) -> None:
        await send_chunked(conn, FrameType.STDIN, data)
        await conn.send(FrameType.STDIN)

    async def _stop_feeder(self) -> None:
        feeder, self._feeder = self._feeder, None
        if feeder is not None and not feeder.done():
            feeder.cancel()
            await asyncio.wait((feeder,))  # never raises: our own cancellation stays ours

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if conn is None:
            return
        # Closing before the exit code makes the agent SIGKILL the process group.
        conn.close()
        await self._stop_feeder()

    @property
    def exit_code(self) -> int | None:
        """The exit code once the Exit event has been received."""
        return self._exit_code

    def _connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("use the process inside 'async with'")
        return self._conn

    async def _within_deadline(self, aw: Awaitable[T]) -> T:
        if self._deadline is None:
            return await aw
        try:
            async with asyncio.timeout_at(self._deadline):
                return await aw
        except TimeoutError:
            if self._conn is not None:
                self._conn.close()  # the agent kills the command
            raise AgentTimeout(f"command did not finish within {self._timeout} s") from None

    # -- input --------------------------------------------------------------------------

    async def send_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the command's stdin (waits while the agent is not keeping up).

        Input for a command that has already ended is dropped, like a write to a
        closed pipe: the events tell how it ended.
        """
        await send_chunked(self._connection(), FrameType.STDIN, data)

    async def close_stdin(self) -> None:
        """Close the command's stdin (an empty STDIN frame)."""
        await self._connection().send(FrameType.STDIN)

    async def kill(self) -> None:
        """SIGKILL the command's process group; the Exit event still follows."""
        await self._connection().send(FrameType.KILL)

    # -- output -------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ExecEvent:
        if self._exit_code is not None:
            raise StopAsyncIteration
        frame = await self._within_deadline(self._connection().recv_answer("the exit code"))
        ftype = frame.type
        if ftype == FrameType.STDOUT:
            return Stdout(frame.payload)
        if ftype == FrameType.STDERR:
            return Stderr(frame.payload)
        if ftype == FrameType.EXIT:
            with translate_errors("reading the exit code"):
                self._exit_code = decode_exit(frame.payload)
            return Exit(self._exit_code)
        raise AgentProtocolError(f"unexpected {FrameType(ftype).name} frame during exec")

    async def wait(self) -> ExecResult:
        """Read to the end, collecting the output not consumed yet."""
        stdout, stderr = bytearray(), bytearray()
        async for event in self:
            if isinstance(event, Stdout):
                stdout += event.data
            elif isinstance(event, Stderr):
                stderr += event.data
        assert self._exit_code is not None
        return ExecResult(self._exit_code, bytes(stdout), bytes(stderr))
