"""The kept-output log (pure, in-process)."""

from __future__ import annotations

import random

import pytest

from kiln.guest.output import MAX_CHUNKS, OutputLog
from kiln.protocol import FrameType

OUT, ERR = int(FrameType.STDOUT), int(FrameType.STDERR)


def test_empty() -> None:
    log = OutputLog(8)
    assert log.read(log.cursor(replay=True)) == []
    assert log.snapshot(OUT) == b""
    assert not log.ended


def test_rejects_a_non_positive_capacity() -> None:
    with pytest.raises(ValueError):
        OutputLog(0)


def test_replay_keeps_the_interleaving_and_coalesces_runs() -> None:
    log = OutputLog(100)
    for stream, data in ((OUT, b"a"), (OUT, b"b"), (ERR, b"c"), (OUT, b"d")):
        log.append(stream, data)
    assert log.read(log.cursor(replay=True)) == [(OUT, b"ab"), (ERR, b"c"), (OUT, b"d")]


def test_each_stream_keeps_its_own_last_bytes() -> None:
    log = OutputLog(4)
    log.append(ERR, b"e")
    for i in range(10):
        log.append(OUT, str(i).encode())
    assert (log.snapshot(OUT), log.snapshot(ERR)) == (b"6789", b"e")
    assert (log.held(OUT), log.written(OUT)) == (4, 10)
    assert log.read(log.cursor(replay=True)) == [(ERR, b"e"), (OUT, b"6789")]


def test_a_cursor_gets_each_byte_once_even_when_a_chunk_grows() -> None:
    log = OutputLog(1000)
    cursor = log.cursor(replay=True)
    log.append(OUT, b"ab")
    assert log.read(cursor) == [(OUT, b"ab")]
    log.append(OUT, b"cd")  # appended to the same chunk
    assert log.read(cursor) == [(OUT, b"cd")]
    assert log.read(cursor) == []


def test_a_live_cursor_starts_at_the_end() -> None:
    log = OutputLog(1000)
    log.append(OUT, b"old")
    cursor = log.cursor(replay=False)
    log.append(OUT, b"new")
    log.append(ERR, b"err")
    assert log.read(cursor) == [(OUT, b"new"), (ERR, b"err")]


def test_a_slow_reader_skips_what_was_dropped() -> None:
    log = OutputLog(4)
    cursor = log.cursor(replay=True)
    log.append(OUT, b"12")
    assert log.read(cursor) == [(OUT, b"12")]
    log.append(ERR, b"x")
    log.append(OUT, b"3456789")
    assert log.read(cursor) == [(ERR, b"x"), (OUT, b"6789")]


def test_random_appends_match_a_reference() -> None:
    rng = random.Random(7)
    log = OutputLog(300)
    reader = log.cursor(replay=True)
    seen = {OUT: bytearray(), ERR: bytearray()}
    written = {OUT: bytearray(), ERR: bytearray()}
    for _ in range(2000):
        stream = rng.choice((OUT, ERR))
        data = rng.randbytes(rng.randrange(1, 50))
        log.append(stream, data)
        written[stream] += data
        if rng.random() < 0.5:  # a reader that keeps up
            for s, chunk in log.read(reader):
                seen[s] += chunk
    for s, chunk in log.read(reader):
        seen[s] += chunk
    for s in (OUT, ERR):
        assert seen[s] == written[s]
        assert log.snapshot(s) == bytes(written[s][-300:])


async def test_a_waiter_taken_before_reading_sees_what_comes_after() -> None:
    log = OutputLog(10)
    cursor = log.cursor(replay=True)
    waiter = log.waiter()
    assert log.read(cursor) == []
    log.append(OUT, b"x")  # while the reader was busy elsewhere
    assert waiter.done()
    assert log.waiter() is not waiter  # a fresh one for the next turn
    again = log.waiter()
    assert log.read(cursor) == [(OUT, b"x")]
    log.end()
    assert again.done() and log.ended


def test_discard_frees_and_keeps_nothing_more() -> None:
    log = OutputLog(10)
    log.append(OUT, b"abc")
    log.discard()
    log.append(OUT, b"def")
    assert (log.snapshot(OUT), log.held(OUT), log.ended) == (b"", 0, True)


def test_alternating_tiny_writes_keep_a_bounded_number_of_chunks() -> None:
    log = OutputLog(1 << 20)
    for _ in range(MAX_CHUNKS * 2):
        log.append(OUT, b"o")
        log.append(ERR, b"e")
    assert log.held(OUT) == log.held(ERR) == MAX_CHUNKS
    assert log.snapshot(ERR) == b"e" * MAX_CHUNKS
