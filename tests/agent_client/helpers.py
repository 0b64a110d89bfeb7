"""Small helpers for the client tests (file and process checks are sync on purpose)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


@contextlib.contextmanager
def running_agent() -> Iterator[tuple[Path, str]]:
    """A test-mode agent subprocess shared by a whole module; yields (socket dir, token).

    Same launch as the ``agent`` fixture of tests/conftest.py, for a wider scope.
    """
    sock_dir = Path(tempfile.mkdtemp(prefix="kcm-", dir="/tmp"))  # short: socket paths
    token = secrets.token_hex(16)
    argv = [sys.executable, "-m", "kiln.guest", "--test-mode", "--socket-dir", str(sock_dir)]
    proc = subprocess.Popen([*argv, "--token", token], env=dict(os.environ, PYTHONPATH=str(SRC)))
    try:
        deadline = time.monotonic() + 10
        while not all((sock_dir / n).exists() for n in ("control.sock", "forward.sock")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the test-mode agent did not start")
            time.sleep(0.01)
        yield sock_dir, token
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def file_text(path: Path) -> str:
    """The stripped content of ``path``, or "" while it is missing."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def make_links(seed: Path, directory: Path, count: int) -> None:
    """``count`` entries ``f000000``... in ``directory``: hard links to ``seed``,
    an order of magnitude faster than creating files on a slow disk."""
    seed.touch()
    for i in range(count):
        os.link(seed, directory / f"f{i:06d}")


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def wait_for_file(path: Path, within: float = 10.0) -> str:
    """The stripped content of ``path`` once it exists and is non-empty."""
    async with asyncio.timeout(within):
        while not (text := file_text(path)):  # noqa: ASYNC110 -- another process writes it
            await asyncio.sleep(0.01)
        return text


async def wait_dead(pid: int, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while pid_alive(pid):  # noqa: ASYNC110 -- polling another process, nothing to await
            await asyncio.sleep(0.01)


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler, unix_path: Path | None = None) -> AsyncIterator[int]:
    """A local server (TCP on 127.0.0.1, or a Unix socket); yields the TCP port (0 for Unix).

    On exit every connection is aborted and its handler awaited, so no socket is
    left for the garbage collector (warnings are errors in this suite).
    """
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # type: ignore[arg-type]
        writers.add(writer)
        try:
            await handler(reader, writer)
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    if unix_path is None:
        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        server = await asyncio.start_unix_server(tracked, str(unix_path))
        port = 0
    try:
        yield port
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()  # handlers read EOF and return
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
