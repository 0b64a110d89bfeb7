"""File transfer: streaming reads and atomic streaming writes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self

from kiln.protocol import (
    FileReadRequest,
    FileReadResponse,
    FileWriteRequest,
    FrameType,
    InvalidMessage,
    decode_exit,
    format_mode,
    parse_mode,
)

from .errors import AgentConnectionLost, AgentProtocolError, RemoteError
from .exec import chunks
from .transport import Connection, translate_errors

#: What ``write_file`` accepts: bytes, a local file to upload, or a byte stream.
WriteSource = bytes | bytearray | memoryview | os.PathLike[str] | AsyncIterable[bytes]

# Local files are read in blocks this big (in a worker thread), then framed.
_FILE_BLOCK = 1 << 20
# STDIN frames (of up to 64 KiB) sent per write.
_BATCH = 4


@dataclass(frozen=True, slots=True)
class FileContent:
    """A file read from the sandbox. ``size`` is the whole file's size;
    ``truncated`` says ``data`` is less than the whole file (offset/limit/max_bytes)."""

    data: bytes
    size: int
    mode: str
    truncated: bool


def mode_string(mode: int | str | None) -> str | None:
    """Normalise a mode to the wire's octal string (``0o644`` → ``"0644"``)."""
    if mode is None:
        return None
    if isinstance(mode, bool) or not isinstance(mode, (int, str)):
        raise TypeError(f"mode must be an int or an octal string, got {type(mode).__name__}")
    if isinstance(mode, str):
        try:
            mode = parse_mode(mode)
        except InvalidMessage as exc:
            raise ValueError(str(exc)) from None
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:o} out of range")
    return format_mode(mode)


class FileReader:
    """A file being read from the sandbox, as an async context manager.

    ``size`` and ``mode`` are known once the block is entered; iterate for the
    content in chunks. Leaving the block early closes the connection, which
    stops the read in the agent.
    """

    __slots__ = (
        "_auth_timeout",
        "_conn",
        "_done",
        "_opener",
        "_received",
        "_request",
        "mode",
        "size",
    )

    def __init__(
        self,
        opener: Callable[[], Awaitable[Connection]],
        request: FileReadRequest,
        auth_timeout: float | None,
    ) -> None:
        self._opener = opener
        self._request = request
        self._auth_timeout = auth_timeout
        self._conn: Connection | None = None
        self._received = 0
        self._done = False
        self.size = 0
        self.mode = ""

    async def __aenter__(self) -> Self:
        conn = await self._opener()
        self._conn = conn
        try:
            await conn.send(FrameType.FILE_READ_REQ, self._request.to_payload())
            frame = await conn.first_answer("FILE_READ_RESP", self._auth_timeout)
            if frame.type != FrameType.FILE_READ_RESP:
                raise AgentProtocolError(
                    f"expected FILE_READ_RESP, got {FrameType(frame.type).name}"
                )
            with translate_errors("reading FILE_READ_RESP"):
                resp = FileReadResponse.from_payload(frame.payload)
            self.size, self.mode = resp.size, resp.mode
        except BaseException:
            conn.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._conn.close()  # before the end, this stops the read in the agent

    @property
    def received(self) -> int:
        """Bytes of content received so far."""
        return self._received

    @property
    def truncated(self) -> bool:
        """After the read: whether the content is less than the whole file."""
        return self._received < self.size

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if self._conn is None:
            raise RuntimeError("use the reader inside 'async with'")
        conn = self._conn
        while True:
            frame = await conn.recv()
            if frame is None:
                raise AgentConnectionLost("the agent closed the connection during a file read")
            conn.check_error(frame)
            if frame.type == FrameType.STDOUT:
                if not frame.payload:
                    continue
                self._received += len(frame.payload)
                return frame.payload
            if frame.type == FrameType.EXIT:
                self._done = True
                with translate_errors("reading the end of a file read"):
                    code = decode_exit(frame.payload)
                if code != 0:
                    raise RemoteError(f"file read ended with status {code}")
                raise StopAsyncIteration
            raise AgentProtocolError(f"unexpected {FrameType(frame.type).name} during a read")

    async def read_all(self) -> bytes:
        """Everything not consumed yet, as one bytes object."""
        parts = [chunk async for chunk in self]
        return b"".join(parts)


async def _file_chunks(f: BinaryIO, size: int) -> AsyncIterator[bytes]:
    remaining = size
    while remaining > 0:
        block = await asyncio.to_thread(f.read, min(_FILE_BLOCK, remaining))
        if not block:
            break
        remaining -= len(block)
        yield block


async def send_content(conn: Connection, request: FileWriteRequest, source: WriteSource) -> bool:
    """Send FILE_WRITE_REQ and then exactly ``request.size`` bytes of ``source``.

    False when the connection broke on the way (the agent refused and closed):
    the caller then reads the agent's answer for the reason.
    """
    header = (FrameType.FILE_WRITE_REQ, request.to_payload())
    if isinstance(source, (bytes, bytearray, memoryview)):
        frames = [(FrameType.STDIN, chunk) for chunk in chunks(source)]
        if len(frames) <= _BATCH:  # request and content in one write
            return await conn.send_frames([header, *frames])
        if not await conn.send_frames([header]):
            return False
        for i in range(0, len(frames), _BATCH):
            if not await conn.send_frames(frames[i : i + _BATCH]):
                return False
        return True
    if not await conn.send_frames([header]):
        return False
    if isinstance(source, os.PathLike):
        with open(source, "rb") as f:  # noqa: ASYNC230 -- opening is quick; reads are threaded
            return await _send_stream(conn, _file_chunks(f, request.size), request.size)
    return await _send_stream(conn, source, request.size)


async def _send_stream(conn: Connection, blocks: AsyncIterable[bytes], size: int) -> bool:
    sent = 0
    async for block in blocks:
        if not block:
            continue
        if sent + len(block) > size:
            raise ValueError(f"source yielded more than the declared size of {size} bytes")
        if not await conn.send_frames([(FrameType.STDIN, chunk) for chunk in chunks(block)]):
            return False
        sent += len(block)
    if sent != size:
        raise ValueError(f"source yielded {sent} bytes, {size} were declared")
    return True


def source_size(source: WriteSource, size: int | None) -> int:
    """The byte count to announce in FILE_WRITE_REQ."""
    if isinstance(source, str):
        raise TypeError("write_file takes bytes, a pathlib.Path or an async iterable, not str")
    if isinstance(source, (bytes, bytearray, memoryview)):
        actual = memoryview(source).nbytes
        if size is not None and size != actual:
            raise ValueError(f"size={size} but the data has {actual} bytes")
        return actual
    if isinstance(source, os.PathLike):
        actual = os.stat(source).st_size
        if size is not None and size != actual:
            raise ValueError(f"size={size} but {os.fspath(source)!r} has {actual} bytes")
        return actual
    if size is None:
        raise ValueError("size is required when writing from an async iterable")
    if size < 0:
        raise ValueError(f"size must not be negative, got {size}")
    return size
