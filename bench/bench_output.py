"""Kept-output log throughput (pure CPU, no agent needed).

    .venv/bin/python -m bench.bench_output

The agent appends every read of a session's pty or a background process's
pipes to an :class:`~kiln.guest.output.OutputLog`. Each sample appends one
batch of 4 KiB chunks (the size a pty read typically returns) to a log,
trimming it many times over; the table gives the time per batch, the rate comes
from the median batch. Target: ≥ 1 GiB/s, so the log never slows a process
that prints fast. Reading what is kept (a reader attaching) is timed too.
"""

from __future__ import annotations

import time

from kiln.guest.output import OutputLog
from kiln.protocol import OUTPUT_KEPT, FrameType

from ._stats import Row, print_table, print_values

REQUIRES: str | None = None  # pure Python: runs everywhere

CHUNK = 4096
BATCH = 4096  # chunks per sample: 16 MiB
SAMPLES = 50
GIB = float(1 << 30)
TARGET_GIB_S = 1.0
SCROLLBACK = 64 * 1024


def _batch_ms(log: OutputLog, chunks: list[tuple[int, bytes]]) -> float:
    append = log.append
    t0 = time.perf_counter()
    for stream, chunk in chunks:
        append(stream, chunk)
    return (time.perf_counter() - t0) * 1000


def _measure(
    label: str, capacity: int, chunks: list[tuple[int, bytes]], target: str
) -> tuple[Row, float]:
    log = OutputLog(capacity)
    for _ in range(3):
        _batch_ms(log, chunks)  # warm up
    samples = [_batch_ms(log, chunks) for _ in range(SAMPLES)]
    row = Row(label, samples, target)
    gib_s = sum(len(c) for _s, c in chunks) / GIB / (row.pct(50) / 1000)
    return row, gib_s


def _replay_ms(log: OutputLog) -> list[float]:
    samples = [0.0] * SAMPLES
    for i in range(SAMPLES):
        t0 = time.perf_counter()
        log.read(log.cursor(replay=True))
        samples[i] = (time.perf_counter() - t0) * 1000
    return samples


def main() -> None:
    out, err = int(FrameType.STDOUT), int(FrameType.STDERR)
    stdout_only = [(out, bytes([i % 256]) * CHUNK) for i in range(BATCH)]
    # Small lines on both streams, every line a separate append: the worst case of
    # per-call overhead (a pump reads up to 64 KiB at once, so it only happens when
    # a process prints slowly). Shown for scale, no target.
    mixed = [(out if i % 4 else err, b"x" * 99 + b"\n") for i in range(BATCH * 8)]
    fast = f"≥ {TARGET_GIB_S:g} GiB/s"
    cases = (
        ("session log 64 KiB: 4 KiB x 4096", SCROLLBACK, stdout_only, fast),
        ("process log 1 MiB: 4 KiB x 4096", OUTPUT_KEPT, stdout_only, fast),
        ("process log 1 MiB: 100 B x 32768, 2 streams", OUTPUT_KEPT, mixed, ""),
    )
    rows, rates = [], []
    for label, capacity, chunks, target in cases:
        row, rate = _measure(label, capacity, chunks, target)
        rows.append(row)
        rates.append((label, f"{rate:.2f} GiB/s", target))
    full = OutputLog()
    _batch_ms(full, stdout_only)
    rows.append(Row("replay 1 MiB to a new reader (read)", _replay_ms(full)))
    print_table("kept output (per batch; replay per call)", rows)
    print_values("kept output throughput (median batch)", rates)


if __name__ == "__main__":
    main()
