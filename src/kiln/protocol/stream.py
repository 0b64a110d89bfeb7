"""A thin asyncio adapter around the sans-IO codec (stdlib only).

Both the guest agent and the host client use it; all framing logic stays in
:mod:`kiln.protocol.frames`.
"""

from __future__ import annotations

import asyncio
import contextlib

from .errors import MalformedFrame
from .frames import Frame, FrameDecoder, FrameType, encode_frame

READ_SIZE = 256 * 1024


class FrameStream:
    """Frames over an asyncio (reader, writer) pair.

    ``send`` writes each frame with one ``write`` call, so concurrent senders on
    the same event loop never interleave bytes.
    """

    __slots__ = ("_decoder", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = FrameDecoder()

    async def recv(self) -> Frame | None:
        """The next frame; None on a clean end of stream between frames.

        Raises MalformedFrame when the stream ends inside a frame, and
        FrameTooLarge/MalformedFrame for a bad length.
        """
        decoder = self._decoder
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            data = await self.reader.read(READ_SIZE)
            if not data:
                decoder.check_eof()
                return None
            decoder.feed(data)

    async def recv_required(self) -> Frame:
        frame = await self.recv()
        if frame is None:
            raise MalformedFrame("connection closed before the expected frame")
        return frame

    def write(self, ftype: int, payload: bytes | bytearray | memoryview = b"") -> None:
        """Queue one frame without waiting for the transport to drain."""
        self.writer.write(encode_frame(ftype, payload))

    async def send(self, ftype: int, payload: bytes | bytearray | memoryview = b"") -> None:
        self.writer.write(encode_frame(ftype, payload))
        await self.writer.drain()

    async def send_error(self, message: str) -> None:
        await self.send(FrameType.ERROR, message.encode("utf-8", "replace")[:65536])

    @property
    def buffered(self) -> int:
        """Bytes received past the last frame returned, not yet decoded."""
        return self._decoder.buffered

    def take_remaining(self) -> bytes:
        """Bytes received past the last frame (for switching to a raw relay)."""
        return self._decoder.take_remaining()

    async def close(self) -> None:
        writer = self.writer
        if writer.is_closing():
            return
        writer.close()
        with contextlib.suppress(OSError):  # ConnectionError is an OSError
            await writer.wait_closed()
