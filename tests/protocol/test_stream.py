"""FrameStream over real sockets: EOF, limits, raw hand-over and concurrent writers."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import AsyncIterator

import pytest

from kiln.protocol import (
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameStream,
    FrameTooLarge,
    FrameType,
    MalformedFrame,
    encode_frame,
)


async def _stream(sock: socket.socket) -> FrameStream:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    return FrameStream(reader, writer)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FrameStream, FrameStream]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = await _stream(a), await _stream(b)
    try:
        yield left, right
    finally:
        await left.close()
        await right.close()


async def test_send_recv_every_type(pair: tuple[FrameStream, FrameStream]) -> None:
    left, right = pair
    for ftype in FrameType:
        await left.send(ftype, bytes([ftype]) * ftype)
    await left.send(0xEE, b"unknown")
    for ftype in FrameType:
        assert await right.recv() == Frame(ftype, bytes([ftype]) * ftype)
    frame = await right.recv()
    assert frame is not None
    assert not frame.known


async def test_clean_eof_is_none(pair: tuple[FrameStream, FrameStream]) -> None:
    left, right = pair
    await left.send(FrameType.STDOUT, b"last")
    await left.close()
    assert await right.recv() == Frame(FrameType.STDOUT, b"last")
    assert await right.recv() is None
    assert await right.recv() is None  # stays at EOF
    with pytest.raises(MalformedFrame):
        await right.recv_required()


async def test_eof_inside_a_frame_is_malformed(pair: tuple[FrameStream, FrameStream]) -> None:
    left, right = pair
    left.writer.write(encode_frame(FrameType.STDOUT, b"truncated")[:7])
    await left.close()
    with pytest.raises(MalformedFrame):
        await right.recv()


async def test_oversized_header_is_refused_before_payload(
    pair: tuple[FrameStream, FrameStream],
) -> None:
    left, right = pair
    # Only the header is ever sent: the reader must not wait for 2 MiB of payload.
    left.writer.write(struct.pack(">IB", 2 << 20, FrameType.STDOUT))
    await left.writer.drain()
    with pytest.raises(FrameTooLarge):
        await asyncio.wait_for(right.recv(), 5)


async def test_max_frame_through_a_socket(pair: tuple[FrameStream, FrameStream]) -> None:
    left, right = pair
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256) + b"x" * (MAX_PAYLOAD % 256)
    send = asyncio.create_task(left.send(FrameType.STDOUT, payload))
    frame = await right.recv()
    await send
    assert frame is not None
    assert frame.payload == payload
    with pytest.raises(FrameTooLarge):
        await left.send(FrameType.STDOUT, payload + b"!")


async def test_take_remaining_after_response(pair: tuple[FrameStream, FrameStream]) -> None:
    left, right = pair
    left.writer.write(encode_frame(FrameType.FWD_RESP, b'{"status":"ok"}') + b"raw relay bytes")
    await left.writer.drain()
    frame = await right.recv()
    assert frame is not None
    assert frame.type == FrameType.FWD_RESP
    leftover = right.take_remaining()
    # The raw bytes either came with the frame or are still in the reader.
    rest = b""
    while len(leftover + rest) < len(b"raw relay bytes"):
        rest += await right.reader.read(100)
    assert leftover + rest == b"raw relay bytes"


async def test_send_error_truncates_long_messages(pair: tuple[FrameStream, FrameStream]) -> None:
    left, right = pair
    await left.send_error("é" * 100_000)
    frame = await right.recv()
    assert frame is not None
    assert frame.type == FrameType.ERROR
    assert len(frame.payload) == 65536
    frame.payload.decode("utf-8", "replace")


async def test_close_twice(pair: tuple[FrameStream, FrameStream]) -> None:
    left, _ = pair
    await left.close()
    await left.close()


# -- concurrent writers -----------------------------------------------------------------

N_FRAMES = 1000


def _payload(writer: int, seq: int) -> bytes:
    # Sizes from 0 to ~40 KiB so that many frames span several socket writes.
    size = (seq * 7919) % 40_000 if seq % 3 else seq % 17
    head = struct.pack(">BI", writer, seq)
    return head + bytes([(writer * 31 + seq) % 256]) * size


def _check(frames: list[Frame], writers: int) -> None:
    assert len(frames) == writers * N_FRAMES
    next_seq = [0] * writers
    for frame in frames:
        assert frame.type in (FrameType.STDOUT, FrameType.STDERR)
        writer, seq = struct.unpack(">BI", frame.payload[:5])
        assert frame.type == (FrameType.STDOUT if writer == 0 else FrameType.STDERR)
        assert seq == next_seq[writer], "frames of one writer out of order"
        assert frame.payload == _payload(writer, seq), "corrupt frame"
        next_seq[writer] += 1
    assert next_seq == [N_FRAMES] * writers


async def test_two_asyncio_writers_never_interleave(
    pair: tuple[FrameStream, FrameStream],
) -> None:
    left, right = pair

    async def pump(writer: int) -> None:
        ftype = FrameType.STDOUT if writer == 0 else FrameType.STDERR
        for seq in range(N_FRAMES):
            await left.send(ftype, _payload(writer, seq))
            if seq % 50 == 0:
                await asyncio.sleep(0)

    async def collect() -> list[Frame]:
        out = []
        while (frame := await right.recv()) is not None:
            out.append(frame)
        return out

    async with asyncio.TaskGroup() as tg:
        reader = tg.create_task(collect())
        pumps = [tg.create_task(pump(0)), tg.create_task(pump(1))]
        await asyncio.gather(*pumps)
        await left.close()
    frames = reader.result()
    _check(frames, 2)
    # Both writers really ran concurrently (their frames are mixed).
    kinds = [f.type for f in frames]
    assert kinds != sorted(kinds)


async def test_two_writers_with_unawaited_write(pair: tuple[FrameStream, FrameStream]) -> None:
    """``write`` (no drain) queues whole frames too."""
    left, right = pair

    async def pump(writer: int) -> None:
        ftype = FrameType.STDOUT if writer == 0 else FrameType.STDERR
        for seq in range(N_FRAMES):
            left.write(ftype, _payload(writer, seq))
            if seq % 10 == 0:
                await asyncio.sleep(0)
        await left.writer.drain()

    async def collect() -> list[Frame]:
        out = []
        while (frame := await right.recv()) is not None:
            out.append(frame)
        return out

    async with asyncio.TaskGroup() as tg:
        reader = tg.create_task(collect())
        await asyncio.gather(pump(0), pump(1))
        await left.close()
    _check(reader.result(), 2)


def test_two_threads_sendall_under_a_lock() -> None:
    """OS threads must serialise whole-frame writes: ``sendall`` may take several
    ``send`` calls for a large buffer, so without a lock two frames could interleave.
    One encoded frame per ``sendall``, under one lock, keeps the stream valid."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lock = threading.Lock()

    def pump(writer: int) -> None:
        ftype = FrameType.STDOUT if writer == 0 else FrameType.STDERR
        for seq in range(N_FRAMES):
            wire = encode_frame(ftype, _payload(writer, seq))
            with lock:
                a.sendall(wire)

    frames: list[Frame] = []

    def collect() -> None:
        decoder = FrameDecoder()
        while data := b.recv(256 * 1024):
            decoder.feed(data)
            frames.extend(decoder.frames())
        decoder.check_eof()

    reader = threading.Thread(target=collect)
    reader.start()
    writers = [threading.Thread(target=pump, args=(i,)) for i in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    a.close()
    reader.join(30)
    b.close()
    _check(frames, 2)
