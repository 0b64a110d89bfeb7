"""``AsyncSandbox.files`` of the unmodified ``e2b`` SDK on a real daemon with real
QEMU microVMs: the async client's own code paths (streamed uploads of async
iterables, streamed reads, the streaming WatchDir with its callbacks).

One sandbox serves the module (created with the sync client, reached with
``AsyncSandbox.connect``); every test works in a directory of its own.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    NotFoundException,
    Sandbox,
    SandboxException,
)

from .conftest import E2B_MARKS, E2bDaemon, kiln_exec, make_sandbox

pytestmark = [*E2B_MARKS, pytest.mark.usefixtures("e2b_env")]

HOME = "/home/user"


@pytest.fixture(scope="module")
def shared(e2b_daemon: E2bDaemon) -> Iterator[Sandbox]:
    sb = make_sandbox(e2b_daemon, timeout=900)
    try:
        yield sb
    finally:
        sb.kill()


@pytest.fixture
async def sandbox(shared: Sandbox) -> AsyncSandbox:
    return await AsyncSandbox.connect(shared.sandbox_id)


@pytest.fixture
def base(request: pytest.FixtureRequest) -> str:
    return f"a-{request.node.name[:30]}-{secrets.token_hex(2)}"


async def _chunks() -> AsyncIterator[bytes]:
    for i in range(5):
        yield f"part {i};".encode()


async def test_write_and_read(sandbox: AsyncSandbox, base: str, kiln_api: httpx.Client) -> None:
    info = await sandbox.files.write(f"{base}/a.txt", "async text")
    assert (info.name, info.type, info.path) == ("a.txt", FileType.FILE, f"{HOME}/{base}/a.txt")
    await sandbox.files.write(f"{base}/stream", _chunks())
    await sandbox.files.write(f"{base}/io", io.BytesIO(b"\x00\x01binary"))
    infos = await sandbox.files.write_files(
        [{"path": f"{base}/m1", "data": "one"}, {"path": f"{base}/m2", "data": b"two"}]
    )
    assert [i.name for i in infos] == ["m1", "m2"]

    assert await sandbox.files.read(f"{base}/a.txt") == "async text"
    assert await sandbox.files.read(f"{base}/stream") == "part 0;part 1;part 2;part 3;part 4;"
    assert await sandbox.files.read(f"{base}/io", format="bytes") == bytearray(b"\x00\x01binary")
    stream = await sandbox.files.read(f"{base}/m2", format="stream")
    assert b"".join([chunk async for chunk in stream]) == b"two"
    owner = kiln_exec(kiln_api, sandbox.sandbox_id, f"stat -c %U {HOME}/{base}/stream")
    assert owner.strip() == "user"


async def test_directories(sandbox: AsyncSandbox, base: str) -> None:
    assert await sandbox.files.make_dir(f"{base}/d/e") is True
    assert await sandbox.files.make_dir(f"{base}/d/e") is False
    await sandbox.files.write(f"{base}/d/e/f.txt", "f")
    names = sorted(e.name for e in await sandbox.files.list(base, depth=3))
    assert names == ["d", "e", "f.txt"]
    assert (await sandbox.files.get_info(f"{base}/d/e/f.txt")).size == 1
    moved = await sandbox.files.rename(f"{base}/d/e/f.txt", f"{base}/g.txt")
    assert moved.path == f"{HOME}/{base}/g.txt"
    await sandbox.files.remove(f"{base}/d")
    assert await sandbox.files.exists(f"{base}/d") is False
    assert await sandbox.files.exists(f"{base}/g.txt") is True
    with pytest.raises(NotFoundException):
        await sandbox.files.get_info(f"{base}/d")
    with pytest.raises(NotFoundException):
        await sandbox.files.read(f"{base}/d/e/f.txt")
    with pytest.raises(SandboxException, match="ermission denied"):
        await sandbox.files.write("/root/nope", "x")


async def test_watch_dir_streams_events(
    sandbox: AsyncSandbox, base: str, kiln_api: httpx.Client
) -> None:
    await sandbox.files.make_dir(base)
    events: list[FilesystemEvent] = []
    got = asyncio.Event()
    ended: list[Any] = []

    def on_event(event: FilesystemEvent) -> None:
        events.append(event)
        if {(e.name, e.type) for e in events} >= {
            ("w.txt", FilesystemEventType.WRITE),
            ("c.txt", FilesystemEventType.REMOVE),
        }:
            got.set()

    handle = await sandbox.files.watch_dir(base, on_event, on_exit=ended.append, recursive=True)
    try:
        await sandbox.files.write(f"{base}/w.txt", "x")
        await asyncio.to_thread(
            kiln_exec, kiln_api, sandbox.sandbox_id, f"cd {HOME}/{base} && touch c.txt && rm c.txt"
        )
        await asyncio.wait_for(got.wait(), 20)
    finally:
        await handle.stop()
    kinds = [(e.name, e.type) for e in events]
    assert ("w.txt", FilesystemEventType.CREATE) in kinds
    assert kinds.index(("c.txt", FilesystemEventType.CREATE)) < kinds.index(
        ("c.txt", FilesystemEventType.REMOVE)
    )
    assert ended == [None]  # stop() is a clean end


async def test_watch_missing_directory(sandbox: AsyncSandbox, base: str) -> None:
    with pytest.raises(NotFoundException):
        await sandbox.files.watch_dir(f"{base}/missing", lambda e: None)
