"""A forwarded TCP connection: raw bytes to and from a port inside the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType
from typing import Final, Self

from .errors import AgentConnectionLost
from .transport import translate_errors

#: Buffer limit of the relay's StreamReader.
STREAM_LIMIT: Final = 1 << 20


class ForwardStream:
    """A byte stream to ``127.0.0.1:port`` inside the sandbox.

    After the agent's FWD_RESP the connection carries no more frames, only
    bytes. ``reader`` and ``writer`` are a plain asyncio stream pair over it
    (hand them to any relay); bytes the service sent right behind FWD_RESP
    (a banner, say) were already received with it and are the first bytes of
    ``reader``, so nothing is lost. The convenience methods below translate
    I/O errors into :class:`~kiln.agent_client.errors.AgentConnectionLost`.
    """

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def over(cls, sock: socket.socket, leftover: bytes) -> ForwardStream:
        """Wrap a socket that has just finished the FWD_REQ/FWD_RESP exchange."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        if leftover:
            reader.feed_data(leftover)  # before the transport delivers anything newer
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except BaseException:
            sock.close()
            raise
        return cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``-1``: everything until EOF); ``b""`` at EOF."""
        with translate_errors("reading the forwarded connection"):
            return await self.reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; AgentConnectionLost if the stream ends first."""
        try:
            with translate_errors("reading the forwarded connection"):
                return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            got = len(exc.partial)
            raise AgentConnectionLost(f"stream ended after {got} of {n} bytes") from exc

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        with translate_errors("writing the forwarded connection"):
            await self.writer.drain()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Write and wait until the transport has room again."""
        self.write(data)
        await self.drain()

    def write_eof(self) -> None:
        """Half-close: the service sees EOF, its answer can still be read."""
        with translate_errors("closing the forwarded connection"):
            self.writer.write_eof()

    def at_eof(self) -> bool:
        return self.reader.at_eof()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()
        else:
            self.abort()
