"""Frame codec and JSON message throughput (pure CPU, no agent needed).

    .venv/bin/python -m bench.bench_protocol

Each sample decodes/encodes one batch; the tables give the time per batch
and, from the median batch, the rate.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from kiln.protocol import ExecRequest, FrameDecoder, FrameStream, FrameType, encode_frame

from ._stats import Row, print_table, print_values

REQUIRES: str | None = None  # pure Python: runs everywhere

READ_SIZE = 256 * 1024  # what FrameStream reads at a time
SMALL = b"x" * 32
BIG = bytes(range(256)) * 256  # 64 KiB
SMALL_BATCH = 20_000
BIG_BATCH = 256  # 16 MiB per batch
SAMPLES = 30
GIB = float(1 << 30)

DECODE_SMALL_TARGET = 300_000  # frames/s
DECODE_BIG_TARGET = 1.0  # GiB/s


def _timed(fn: Callable[[], object], samples: int = SAMPLES, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _decode_batch(chunks: list[bytes], expect: int) -> Callable[[], object]:
    def run() -> None:
        decoder = FrameDecoder()
        n = 0
        for chunk in chunks:
            decoder.feed(chunk)
            while decoder.next_frame() is not None:
                n += 1
        assert n == expect, (n, expect)

    return run


def _split(wire: bytes, size: int) -> list[bytes]:
    return [wire[i : i + size] for i in range(0, len(wire), size)]


def _encode_batch(payload: bytes, count: int) -> Callable[[], object]:
    def run() -> None:
        for _ in range(count):
            encode_frame(FrameType.STDOUT, payload)

    return run


REQ = ExecRequest(
    cmd=("bash", "-c", "cd /workspace && make test"),
    env={"PATH": "/usr/bin:/bin", "HOME": "/home/sandbox", "CI": "1"},
    cwd="/workspace",
)
REQ_PAYLOAD = REQ.to_payload()
JSON_BATCH = 5_000


def _json_encode() -> None:
    for _ in range(JSON_BATCH):
        REQ.to_payload()


def _json_decode() -> None:
    for _ in range(JSON_BATCH):
        ExecRequest.from_payload(REQ_PAYLOAD)


async def _stream_small(count: int) -> list[float]:
    """Small frames through FrameStream over a real socketpair (write + recv)."""
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_unix_connection(sock=a)
    rb, wb = await asyncio.open_unix_connection(sock=b)
    left, right = FrameStream(ra, wa), FrameStream(rb, wb)
    samples = []
    for _ in range(SAMPLES + 2):
        t0 = time.perf_counter()

        async def produce() -> None:
            for i in range(count):
                left.write(FrameType.STDOUT, SMALL)
                if i % 256 == 0:
                    await left.writer.drain()
            await left.writer.drain()

        task = asyncio.create_task(produce())
        for _ in range(count):
            await right.recv()
        await task
        samples.append((time.perf_counter() - t0) * 1000)
    await left.close()
    await right.close()
    return samples[2:]


def _rate(row: Row, items: int, unit: float = 1.0) -> float:
    return items / unit / (row.pct(50) / 1000)


def main() -> None:
    small_wire = encode_frame(FrameType.STDOUT, SMALL) * SMALL_BATCH
    big_wire = encode_frame(FrameType.STDOUT, BIG) * BIG_BATCH
    big_bytes = len(big_wire)

    dec_small = Row(
        f"decode {SMALL_BATCH} x 32 B frames (256 KiB feeds)",
        _timed(_decode_batch(_split(small_wire, READ_SIZE), SMALL_BATCH)),
        f"≥ {DECODE_SMALL_TARGET:,} frames/s",
    )
    dec_small_1 = Row(
        f"decode {SMALL_BATCH} x 32 B frames (one feed)",
        _timed(_decode_batch([small_wire], SMALL_BATCH)),
        f"≥ {DECODE_SMALL_TARGET:,} frames/s",
    )
    dec_big = Row(
        f"decode {BIG_BATCH} x 64 KiB frames (256 KiB feeds)",
        _timed(_decode_batch(_split(big_wire, READ_SIZE), BIG_BATCH)),
        f"≥ {DECODE_BIG_TARGET} GiB/s",
    )
    dec_big_odd = Row(
        f"decode {BIG_BATCH} x 64 KiB frames (4099 B feeds)",
        _timed(_decode_batch(_split(big_wire, 4099), BIG_BATCH)),
        f"≥ {DECODE_BIG_TARGET} GiB/s",
    )
    enc_small = Row(
        f"encode {SMALL_BATCH} x 32 B frames",
        _timed(_encode_batch(SMALL, SMALL_BATCH)),
        "≥ decode rate",
    )
    enc_big = Row(
        f"encode {BIG_BATCH} x 64 KiB frames", _timed(_encode_batch(BIG, BIG_BATCH)), "≥ decode"
    )
    json_enc = Row(f"ExecRequest.to_payload x {JSON_BATCH}", _timed(_json_encode), "")
    json_dec = Row(f"ExecRequest.from_payload x {JSON_BATCH}", _timed(_json_decode), "")
    stream_n = 5_000
    stream = Row(
        f"FrameStream socketpair {stream_n} x 32 B",
        asyncio.run(_stream_small(stream_n)),
        "",
    )
    rows = [dec_small, dec_small_1, dec_big, dec_big_odd, enc_small, enc_big, json_enc, json_dec]
    print_table("protocol: time per batch", [*rows, stream])

    def verdict(value: float, target: float) -> str:
        return "ok" if value >= target else "MISSED"

    r_dec_small = _rate(dec_small, SMALL_BATCH)
    r_dec_small_1 = _rate(dec_small_1, SMALL_BATCH)
    r_enc_small = _rate(enc_small, SMALL_BATCH)
    r_dec_big = _rate(dec_big, big_bytes, GIB)
    r_dec_big_odd = _rate(dec_big_odd, big_bytes, GIB)
    r_enc_big = _rate(enc_big, big_bytes, GIB)
    print_values(
        "protocol: rates at the median batch",
        [
            (
                "decode small frames, 256 KiB feeds",
                f"{r_dec_small:,.0f} /s",
                f"≥ {DECODE_SMALL_TARGET:,} /s: {verdict(r_dec_small, DECODE_SMALL_TARGET)}",
            ),
            (
                "decode small frames, one feed",
                f"{r_dec_small_1:,.0f} /s",
                f"≥ {DECODE_SMALL_TARGET:,} /s: {verdict(r_dec_small_1, DECODE_SMALL_TARGET)}",
            ),
            (
                "encode small frames",
                f"{r_enc_small:,.0f} /s",
                f"≥ decode: {verdict(r_enc_small, r_dec_small)}",
            ),
            (
                "decode 64 KiB frames, 256 KiB feeds",
                f"{r_dec_big:.2f} GiB/s",
                f"≥ {DECODE_BIG_TARGET} GiB/s: {verdict(r_dec_big, DECODE_BIG_TARGET)}",
            ),
            (
                "decode 64 KiB frames, 4099 B feeds",
                f"{r_dec_big_odd:.2f} GiB/s",
                f"≥ {DECODE_BIG_TARGET} GiB/s: {verdict(r_dec_big_odd, DECODE_BIG_TARGET)}",
            ),
            (
                "encode 64 KiB frames",
                f"{r_enc_big:.2f} GiB/s",
                f"≥ decode: {verdict(r_enc_big, r_dec_big)}",
            ),
            ("ExecRequest encode", f"{_rate(json_enc, JSON_BATCH):,.0f} /s", ""),
            (
                "ExecRequest decode (strict validation)",
                f"{_rate(json_dec, JSON_BATCH):,.0f} /s",
                "",
            ),
            ("FrameStream over socketpair, 32 B", f"{_rate(stream, stream_n):,.0f} frames/s", ""),
        ],
    )


if __name__ == "__main__":
    main()
