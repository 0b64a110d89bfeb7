"""Scrollback ring buffer throughput (pure CPU, no agent needed).

    .venv/bin/python -m bench.bench_ringbuffer

Each sample writes one batch of 4 KiB chunks (the size a pty read typically
returns) into a 64 KiB ring, wrapping it many times; the table gives the time
per batch, and the rate comes from the median batch. Target: ≥ 1 GiB/s.
"""

from __future__ import annotations

import time

from kiln.guest.ringbuffer import RingBuffer

from ._stats import Row, print_table, print_values

REQUIRES: str | None = None  # pure Python: runs everywhere

CHUNK = 4096
BATCH = 4096  # chunks per sample: 16 MiB
SAMPLES = 50
GIB = float(1 << 30)
TARGET_GIB_S = 1.0


def _batch_ms(ring: RingBuffer, chunks: list[bytes]) -> float:
    write = ring.write
    t0 = time.perf_counter()
    for chunk in chunks:
        write(chunk)
    return (time.perf_counter() - t0) * 1000


def _measure(label: str, chunks: list[bytes]) -> tuple[Row, float]:
    ring = RingBuffer()
    for _ in range(3):
        _batch_ms(ring, chunks)  # warm up
    samples = [_batch_ms(ring, chunks) for _ in range(SAMPLES)]
    row = Row(label, samples, f"≥ {TARGET_GIB_S:g} GiB/s")
    gib_s = sum(len(c) for c in chunks) / GIB / (row.pct(50) / 1000)
    return row, gib_s


def main() -> None:
    aligned = [bytes([i % 256]) * CHUNK for i in range(BATCH)]
    # 4 KiB writes that do not divide the ring evenly: every 16th one wraps.
    odd = [bytes([i % 256]) * (CHUNK - 1) for i in range(BATCH)]
    rows, rates = [], []
    for label, chunks in (("ring write 4 KiB x 4096", aligned), ("ring write 4095 B x 4096", odd)):
        row, rate = _measure(label, chunks)
        rows.append(row)
        rates.append((label, f"{rate:.2f} GiB/s", f"≥ {TARGET_GIB_S:g} GiB/s"))
    ring = RingBuffer()
    for chunk in aligned[:32]:
        ring.write(chunk)
    snapshot = [0.0] * SAMPLES
    for i in range(SAMPLES):
        t0 = time.perf_counter()
        ring.snapshot()
        snapshot[i] = (time.perf_counter() - t0) * 1000
    rows.append(Row("ring snapshot 64 KiB (attach)", snapshot))
    print_table("ring buffer (per 16 MiB batch; snapshot per call)", rows)
    print_values("ring buffer throughput (median batch)", rates)


if __name__ == "__main__":
    main()
