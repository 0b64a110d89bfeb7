"""Port forwarding: FWD_REQ → dial 127.0.0.1:port in the sandbox → raw relay."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from kiln.protocol import ForwardRequest, FrameStream, FrameType, StatusResponse

from .context import GuestContext, recv_frame
from .errors import RequestError

#: Linux only (the guest's kernel; a test-mode agent on another OS goes without).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
DIAL_TIMEOUT = 10.0
RELAY_CHUNK = 256 * 1024


async def serve_forward(conn: FrameStream, ctx: GuestContext) -> None:
    """The forward connection after AUTH: one FWD_REQ, then bytes both ways."""
    frame = await recv_frame(conn)
    if frame is None:
        return
    if frame.type != FrameType.FWD_REQ:
        raise RequestError(f"expected FWD_REQ, got {FrameType(frame.type).name}")
    req = ForwardRequest.from_payload(frame.payload)
    try:
        target_reader, target_writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", req.port, limit=RELAY_CHUNK), DIAL_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError):
            reason = "timed out"
        else:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
        message = f"cannot connect to 127.0.0.1:{req.port}: {reason}"
        await conn.send(FrameType.FWD_RESP, StatusResponse("error", message).to_payload())
        return
    ctx.touch()
    try:
        await conn.send(FrameType.FWD_RESP, StatusResponse("ok").to_payload())
        # Bytes the host sent right behind FWD_REQ are already in the frame decoder.
        early = conn.take_remaining()
        if early:
            target_writer.write(early)
        await relay(conn.reader, conn.writer, target_reader, target_writer, ctx)
    finally:
        target_writer.close()
        with contextlib.suppress(OSError):
            await target_writer.wait_closed()


async def relay(
    host_reader: asyncio.StreamReader,
    host_writer: asyncio.StreamWriter,
    target_reader: asyncio.StreamReader,
    target_writer: asyncio.StreamWriter,
    ctx: GuestContext,
) -> None:
    """Copy both ways; EOF on one side half-closes the other; ends when both are done
    or either fails."""
    up = asyncio.create_task(_copy(host_reader, target_writer, ctx))
    service = target_writer.get_extra_info("socket")
    down = asyncio.create_task(_copy(target_reader, host_writer, ctx, quickack=service))
    try:
        await asyncio.wait((up, down), return_when=asyncio.FIRST_EXCEPTION)
    finally:
        up.cancel()
        down.cancel()
        await asyncio.wait((up, down))
    for task in (up, down):
        if not task.cancelled():
            task.exception()  # retrieved: a reset on either side just ends the relay


async def _copy(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ctx: GuestContext,
    quickack: socket.socket | None = None,
) -> None:
    while data := await reader.read(RELAY_CHUNK):
        if quickack is not None and _QUICKACK is not None:
            # A service with Nagle on (python's http.server, many others) sends its
            # headers and body in two writes and waits for the first one's ACK before
            # sending the second; Linux delays that ACK by up to 40 ms. Acknowledge at
            # once (the flag wears off after each read, so set it every time).
            with contextlib.suppress(OSError):
                quickack.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        ctx.touch()
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()
