"""The scrollback ring buffer (pure, in-process)."""

from __future__ import annotations

import random

import pytest

from kiln.guest.ringbuffer import DEFAULT_CAPACITY, RingBuffer


def test_empty() -> None:
    ring = RingBuffer(8)
    assert ring.snapshot() == b""
    assert len(ring) == 0
    assert ring.total_written == 0


def test_write_below_capacity_keeps_everything_in_order() -> None:
    ring = RingBuffer(16)
    ring.write(b"abc")
    ring.write(bytearray(b"def"))
    ring.write(memoryview(b"ghi"))
    assert ring.snapshot() == b"abcdefghi"
    assert len(ring) == 9


def test_wrap_keeps_the_last_capacity_bytes_in_order() -> None:
    ring = RingBuffer(8)
    ring.write(b"012345")
    ring.write(b"6789")  # wraps: the first two bytes are overwritten
    assert ring.snapshot() == b"23456789"
    ring.write(b"ab")
    assert ring.snapshot() == b"456789ab"
    assert len(ring) == 8
    assert ring.total_written == 12


def test_exactly_full_and_oversized_writes() -> None:
    ring = RingBuffer(8)
    ring.write(b"01234567")
    assert ring.snapshot() == b"01234567"
    ring.write(b"x" * 5 + b"ABCDEFGH")  # larger than the ring: only its tail survives
    assert ring.snapshot() == b"ABCDEFGH"
    ring.write(b"Z")
    assert ring.snapshot() == b"BCDEFGHZ"


def test_empty_write_is_a_no_op() -> None:
    ring = RingBuffer(4)
    ring.write(b"ab")
    ring.write(b"")
    assert ring.snapshot() == b"ab"


def test_clear() -> None:
    ring = RingBuffer(4)
    ring.write(b"abcdef")
    ring.clear()
    assert ring.snapshot() == b""
    ring.write(b"xy")
    assert ring.snapshot() == b"xy"


@pytest.mark.parametrize("capacity", [1, 7, 64, 4096])
def test_random_writes_match_a_reference(capacity: int) -> None:
    rng = random.Random(capacity)
    ring = RingBuffer(capacity)
    everything = bytearray()
    for _ in range(500):
        chunk = rng.randbytes(rng.choice([0, 1, 3, capacity - 1, capacity, capacity + 5, 100]))
        ring.write(chunk)
        everything += chunk
        assert ring.snapshot() == bytes(everything[-capacity:])
    assert ring.total_written == len(everything)


def test_default_capacity_is_64_kib() -> None:
    ring = RingBuffer()
    assert ring.capacity == DEFAULT_CAPACITY == 64 * 1024
    ring.write(b"a" * 70_000 + b"tail")
    data = ring.snapshot()
    assert len(data) == 65536
    assert data.endswith(b"tail")


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RingBuffer(0)
