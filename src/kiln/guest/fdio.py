"""asyncio over raw non-blocking file descriptors (pipes and pty masters).

The agent reads children's pipes and pty masters with ``os.read`` and waits
with ``loop.add_reader``, instead of asyncio's pipe transports: fewer objects on
the exec hot path, and full control over when a descriptor is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from kiln.protocol import CHUNK_SIZE

#: Input chunks queued for a slow reader before the connection stops being read.
QUEUE_DEPTH = 16


def wake(fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` unless it is already done (a reader/writer or exit callback)."""
    if not fut.done():
        fut.set_result(None)


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, wake, fut)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def read_chunks(fd: int) -> AsyncIterator[bytes]:
    """What a non-blocking pipe gives, in reads of up to CHUNK_SIZE, until EOF
    (or a read error, which ends it the same way)."""
    while True:
        try:
            data = os.read(fd, CHUNK_SIZE)
        except BlockingIOError:
            await wait_readable(fd)
            continue
        except OSError:
            return
        if not data:
            return
        yield data


def close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class FdWriter:
    """Feeds a non-blocking fd (a child's stdin, a pty master) in the background.

    The connection reader hands chunks over with :meth:`put` and is held up only
    when ``QUEUE_DEPTH`` chunks are pending, so it keeps seeing KILL frames and
    disconnects while a child is slow to read its input. If the reading side is
    gone (EPIPE, EIO), further input is dropped: the child cannot read it anyway.
    ``put(b"")`` closes the fd when the writer owns it (stdin EOF).
    """

    __slots__ = ("_broken", "_closed", "_fd", "_owns_fd", "_queue", "_stopped", "_task")

    def __init__(self, fd: int, *, owns_fd: bool) -> None:
        self._fd = fd
        self._owns_fd = owns_fd
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_DEPTH)
        self._task: asyncio.Task[None] | None = None
        self._broken = False
        self._closed = False
        self._stopped = False

    @property
    def closed(self) -> bool:
        return self._closed or self._broken or self._stopped

    async def put(self, data: bytes) -> None:
        if self.closed:
            return
        if not data and self._owns_fd and self._task is None:
            self._close_fd()  # EOF with nothing pending: close right away
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await self._queue.put(data)

    async def _run(self) -> None:
        while True:
            data = await self._queue.get()
            if not data:
                if self._owns_fd:
                    self._close_fd()
                    return
                continue
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self._fd, view)
                except BlockingIOError:
                    await wait_writable(self._fd)
                    continue
                except OSError:
                    self._fail()
                    return
                view = view[written:]

    def _fail(self) -> None:
        self._broken = True
        self._drop_pending()
        if self._owns_fd:
            self._close_fd()

    def _drop_pending(self) -> None:
        # Unblocks whoever waits in put() for room; their input is dropped too.
        while not self._queue.empty():
            self._queue.get_nowait()

    def _close_fd(self) -> None:
        if not self._closed:
            self._closed = True
            close_fd(self._fd)

    async def aclose(self) -> None:
        """Stop writing (pending input is dropped) and close the fd if owned."""
        # Stopped first: a put() while we wait below must not start a new writer.
        self._stopped = True
        task, self._task = self._task, None
        self._drop_pending()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        self._drop_pending()
        if self._owns_fd:
            self._close_fd()
