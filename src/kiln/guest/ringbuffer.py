"""The scrollback of a TTY session: a fixed-size byte ring.

A ``bytearray`` of the full capacity is allocated once; writes copy into it
with at most two slice assignments (memcpy) and never allocate, so the session
pump can keep up with a pty at well over 1 GiB/s (see bench/bench_ringbuffer.py).
"""

from __future__ import annotations

DEFAULT_CAPACITY = 64 * 1024


class RingBuffer:
    """Keeps the last ``capacity`` bytes written, in order."""

    __slots__ = ("_buf", "_capacity", "_pos", "_size", "_total")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"ring buffer capacity must be positive, got {capacity}")
        self._buf = bytearray(capacity)
        self._capacity = capacity
        self._pos = 0  # where the next byte goes
        self._size = 0  # bytes held (≤ capacity)
        self._total = 0  # bytes ever written

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def total_written(self) -> int:
        return self._total

    def __len__(self) -> int:
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        cap = self._capacity
        self._total += n
        if n >= cap:
            # Only the tail survives; it fills the buffer exactly, starting at 0.
            with memoryview(data) as view:
                self._buf[:] = view[n - cap :]
            self._pos = 0
            self._size = cap
            return
        pos = self._pos
        end = pos + n
        if end <= cap:
            self._buf[pos:end] = data
            self._pos = end if end < cap else 0
        else:
            first = cap - pos
            with memoryview(data) as view:
                self._buf[pos:] = view[:first]
                self._buf[: n - first] = view[first:]
            self._pos = n - first
        size = self._size + n
        self._size = size if size < cap else cap

    def snapshot(self) -> bytes:
        """Everything held, oldest byte first."""
        if self._size < self._capacity:
            # Not wrapped yet: the data starts at 0.
            return bytes(self._buf[: self._size])
        pos = self._pos
        return bytes(self._buf[pos:]) + bytes(self._buf[:pos])

    def clear(self) -> None:
        self._pos = 0
        self._size = 0
