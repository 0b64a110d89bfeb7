"""``kiln shell``: the local terminal in raw mode, relayed over the sandbox's WebSocket.

One asyncio loop, two tasks: keystrokes (read by a loop reader on stdin) and
window resizes (SIGWINCH) go through one queue to a sender task, so they
reach the WebSocket in order; a receiver task writes the session's output to
stdout. Ctrl+\\ (0x1c; ISIG is off in raw mode, so it arrives as a byte), or
the key given with ``--detach-key``/``KILN_DETACH_KEY``, detaches: the socket
closes, the session keeps running in the sandbox, and its id is printed so
``kiln shell SANDBOX --session ID`` can reattach.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .format import format_detached

if TYPE_CHECKING:
    from kiln.sdk import AsyncShellSession

DETACH_KEY = b"\x1c"  # Ctrl+\


def split_detach(data: bytes, key: bytes = DETACH_KEY) -> tuple[bytes, bool]:
    """``(bytes to send, detach?)``: everything before the detach key, and whether it was
    pressed."""
    before, sep, _ = data.partition(key)
    return before, bool(sep)


def terminal_size(fd: int) -> tuple[int, int]:
    """``(rows, cols)`` of the terminal on ``fd`` (24x80 when it has none)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return size.lines or 24, size.columns or 80


@contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode; restored however the block ends."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def relay(
    session: AsyncShellSession, fd_in: int, fd_out: int, detach_key: bytes = DETACH_KEY
) -> bool:
    """Relay until the session ends (False) or the user detaches (True)."""
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue[bytes | tuple[int, int] | None] = asyncio.Queue()
    detached = False

    def on_input() -> None:
        nonlocal detached
        try:
            data = os.read(fd_in, 65536)
        except OSError:
            data = b""
        send, detach = split_detach(data, detach_key)
        if send:
            outbox.put_nowait(send)
        if detach or not data:  # Ctrl+\ or end of input: leave the session running
            detached = True
            loop.remove_reader(fd_in)
            outbox.put_nowait(None)

    def on_resize() -> None:
        outbox.put_nowait(terminal_size(fd_out))

    async def sender() -> None:
        while (item := await outbox.get()) is not None:
            if isinstance(item, bytes):
                await session.send(item)
            else:
                await session.resize(*item)

    async def receiver() -> None:
        async for chunk in session:
            _write_all(fd_out, chunk)

    loop.add_reader(fd_in, on_input)
    loop.add_signal_handler(signal.SIGWINCH, on_resize)
    tasks = {asyncio.create_task(sender()), asyncio.create_task(receiver())}
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # re-raise a failure of either side
    finally:
        loop.remove_reader(fd_in)
        loop.remove_signal_handler(signal.SIGWINCH)
        for task in tasks:
            task.cancel()
    return detached


async def _shell(
    url: str,
    token: str | None,
    sandbox: str,
    *,
    session_id: str | None,
    cmd: str | None,
    user: str | None,
    detach_key: bytes,
) -> int:
    from kiln.sdk import AsyncKiln  # noqa: PLC0415

    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    rows, cols = terminal_size(fd_out)
    async with AsyncKiln(url, token) as k:
        ref = k.sandboxes.ref(sandbox)
        session = await ref.shell(session_id=session_id, rows=rows, cols=cols, cmd=cmd, user=user)
        try:
            with raw_mode(fd_in):
                detached = await relay(session, fd_in, fd_out, detach_key)
        finally:
            await session.close()
    if detached:
        print("\r\n" + format_detached(sandbox, session.session_id), file=sys.stderr)
        return 0
    code = session.exit_code or 0
    return code if 0 <= code <= 255 else 255


def run_shell(
    url: str,
    token: str | None,
    sandbox: str,
    *,
    session_id: str | None = None,
    cmd: str | None = None,
    user: str | None = None,
    detach_key: bytes = DETACH_KEY,
) -> int:
    """Attach the local terminal to a (new or existing) session; the exit status for kiln."""
    return asyncio.run(
        _shell(
            url, token, sandbox, session_id=session_id, cmd=cmd, user=user, detach_key=detach_key
        )
    )
