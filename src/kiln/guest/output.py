"""The kept output of a process: the last N bytes of stdout and of stderr, in the
order they came, for any number of readers at once.

Why not one ring per stream: a reader that attaches late must see stdout and
stderr interleaved as they were written, and a slow reader must never hold up
the process (its pipe must keep draining) nor make the agent buffer without
bound. So the output is a log of chunks with sequence numbers, each stream
bounded on its own; every reader keeps a :class:`Cursor` (the chunk it is at and
how far into each stream it has read) and pulls what is new. A reader that
falls more than the capacity behind simply skips what was dropped.

Small writes are appended to the last chunk while it is short, so a process
that prints one line at a time costs a few chunks per 64 KiB, not one each.
Writes that alternate between stdout and stderr cannot be merged, and each
chunk costs ~160 bytes of bookkeeping however small it is: so a stream also
keeps at most :data:`MAX_CHUNKS` chunks, which bounds the memory of a log at
about twice its capacity whatever the write pattern (the kept bytes then fall
below the capacity).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from kiln.protocol import CHUNK_SIZE, OUTPUT_KEPT, FrameType

STREAMS: Final[tuple[int, int]] = (int(FrameType.STDOUT), int(FrameType.STDERR))
#: Chunks kept per stream (see the module docstring).
MAX_CHUNKS: Final = 4096


class _Chunk:
    __slots__ = ("data", "seq", "start", "stream")

    def __init__(self, seq: int, stream: int, start: int, data: bytes) -> None:
        self.seq = seq
        self.stream = stream
        self.start = start  # position of data[0] in its stream
        self.data = bytearray(data)


@dataclass(slots=True)
class Cursor:
    """How far one reader has read: the chunk it is at, and per stream the position."""

    seq: int = 0
    positions: dict[int, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))


class OutputLog:
    """Bounded, ordered stdout/stderr log with pull-based readers."""

    __slots__ = (
        "_capacity",
        "_chunks",
        "_discarding",
        "_ended",
        "_held",
        "_last",
        "_next_seq",
        "_waiter",
        "_written",
    )

    def __init__(self, capacity: int = OUTPUT_KEPT) -> None:
        if capacity <= 0:
            raise ValueError(f"output capacity must be positive, got {capacity}")
        self._capacity = capacity
        self._chunks: dict[int, deque[_Chunk]] = {s: deque() for s in STREAMS}
        self._held = dict.fromkeys(STREAMS, 0)
        self._written = dict.fromkeys(STREAMS, 0)
        self._last: _Chunk | None = None
        self._next_seq = 0
        self._ended = False
        self._discarding = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def ended(self) -> bool:
        """No reader will get more: the process is over (see :meth:`end`)."""
        return self._ended

    def written(self, stream: int) -> int:
        """Bytes ever written to ``stream``."""
        return self._written[stream]

    def held(self, stream: int) -> int:
        """Bytes of ``stream`` kept now (≤ capacity)."""
        return self._held[stream]

    # ---- writing -----------------------------------------------------------------

    def append(self, stream: int, data: bytes) -> None:
        n = len(data)
        if not n or self._discarding:
            return
        last = self._last
        if last is not None and last.stream == stream and len(last.data) < CHUNK_SIZE:
            last.data += data
        else:
            last = _Chunk(self._next_seq, stream, self._written[stream], data)
            self._next_seq += 1
            self._chunks[stream].append(last)
            self._last = last
        self._written[stream] += n
        self._held[stream] += n
        self._trim(stream)
        self._wake()

    def _trim(self, stream: int) -> None:
        excess = self._held[stream] - self._capacity
        chunks = self._chunks[stream]
        if len(chunks) > MAX_CHUNKS:
            # Drop the oldest chunk whole: at least its bytes are over.
            excess = max(excess, len(chunks[0].data))
        while excess > 0:
            first = chunks[0]
            size = len(first.data)
            if size <= excess:
                chunks.popleft()
                if first is self._last:
                    self._last = None
                self._held[stream] -= size
                excess -= size
            else:
                del first.data[:excess]  # bytearray: cheap at the front
                first.start += excess
                self._held[stream] -= excess
                excess = 0

    def end(self) -> None:
        """Readers get no more: they finish once they have read what is kept.
        Output appended later is still kept for readers that come after."""
        self._ended = True
        self._wake()

    def discard(self) -> None:
        """Free what is kept and keep nothing more (nobody can read this log any more)."""
        self._discarding = True
        for stream, chunks in self._chunks.items():
            chunks.clear()
            self._held[stream] = 0
        self._last = None
        self.end()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- reading -----------------------------------------------------------------

    def cursor(self, *, replay: bool) -> Cursor:
        """A new reader's cursor: at the oldest kept byte, or at the end (live only)."""
        if replay:
            return Cursor()
        # At the last chunk, not after it: more may be appended to it.
        seq = self._next_seq if self._last is None else self._last.seq
        return Cursor(seq, dict(self._written))

    def read(self, cursor: Cursor) -> list[tuple[int, bytes]]:
        """What ``cursor`` has not read yet, as (stream, bytes) in order; advances it."""
        pending: list[_Chunk] = []
        for chunks in self._chunks.values():
            # Walk back from the newest: a live reader only needs the last chunk or two.
            for i in range(len(chunks) - 1, -1, -1):
                chunk = chunks[i]
                if chunk.seq < cursor.seq:
                    break
                pending.append(chunk)
        if not pending:
            return []
        pending.sort(key=lambda c: c.seq)
        out = []
        positions = cursor.positions
        for chunk in pending:
            stream = chunk.stream
            offset = positions[stream] - chunk.start
            data = bytes(chunk.data[offset:]) if offset > 0 else bytes(chunk.data)
            if data:
                out.append((stream, data))
            positions[stream] = chunk.start + len(chunk.data)
        # Stay at the last chunk: it may still grow.
        cursor.seq = pending[-1].seq
        return out

    def snapshot(self, stream: int) -> bytes:
        """Everything kept of one stream, oldest byte first."""
        return b"".join(bytes(c.data) for c in self._chunks[stream])

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved by the next append or :meth:`end`.

        Take it *before* reading: whatever comes after that read then resolves
        it, so a reader that was busy meanwhile (writing to a slow host) cannot
        miss a wakeup. Shared by every reader: never cancel it.
        """
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter
