"""File operations through the client: read (whole, truncated, streamed), write, stat, ls."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kiln.agent_client import AgentClient, RemoteError, RemoteNotFound
from kiln.protocol import CHUNK_SIZE, LS_LIMIT

from .helpers import make_links, names_in


@pytest.fixture
def client(shared_client: AgentClient) -> AgentClient:
    """One agent for the whole module: these tests do not depend on its state."""
    return shared_client


async def test_read_whole_file(client: AgentClient, workdir: Path) -> None:
    path = workdir / "hello.txt"
    path.write_bytes(b"hello\nworld\n")
    path.chmod(0o640)
    content = await client.read_file(str(path))
    assert content.data == b"hello\nworld\n"
    assert content.size == 12
    assert content.mode == "0640"
    assert not content.truncated


async def test_read_empty_and_binary(client: AgentClient, workdir: Path) -> None:
    (workdir / "empty").write_bytes(b"")
    empty = await client.read_file(str(workdir / "empty"))
    assert (empty.data, empty.size, empty.truncated) == (b"", 0, False)
    blob = os.urandom(300_000)
    (workdir / "blob").write_bytes(blob)
    got = await client.read_file(str(workdir / "blob"))
    assert got.data == blob
    assert got.size == len(blob)


async def test_read_unicode_name(client: AgentClient, workdir: Path) -> None:
    path = workdir / "ünï cødé ✓.txt"
    path.write_text("ok")
    assert (await client.read_file(str(path))).data == b"ok"


LINES = b"".join(f"line {i}\n".encode() for i in range(1, 101))


@pytest.mark.parametrize(
    "case",
    [
        (0, 0, 0, LINES),
        (1, 0, 0, LINES),
        (10, 0, 0, b"".join(f"line {i}\n".encode() for i in range(10, 101))),
        (0, 3, 0, b"line 1\nline 2\nline 3\n"),
        (5, 2, 0, b"line 5\nline 6\n"),
        (0, 0, 10, LINES[:10]),
        (50, 0, 4, b"line"),
        (99, 10, 0, b"line 99\nline 100\n"),
        (0, 5, 20, LINES[:20]),  # max_bytes hit first
        (0, 2, 1000, b"line 1\nline 2\n"),  # limit hit first
    ],
)
async def test_read_truncation(
    client: AgentClient, workdir: Path, case: tuple[int, int, int, bytes]
) -> None:
    offset, limit, max_bytes, expected = case
    path = workdir / "lines.txt"
    path.write_bytes(LINES)
    content = await client.read_file(str(path), offset=offset, limit=limit, max_bytes=max_bytes)
    assert content.data == expected
    assert content.size == len(LINES)  # always the whole file's size
    assert content.truncated == (expected != LINES)


async def test_read_offset_past_the_end(client: AgentClient, workdir: Path) -> None:
    path = workdir / "lines.txt"
    path.write_bytes(LINES)
    content = await client.read_file(str(path), offset=1000)
    assert content.data == b""
    assert content.truncated


async def test_read_stream(client: AgentClient, workdir: Path) -> None:
    data = os.urandom(5 * CHUNK_SIZE + 123)
    path = workdir / "big"
    path.write_bytes(data)
    chunks = []
    async with client.read_file_stream(str(path)) as reader:
        assert reader.size == len(data)  # known before any content
        assert reader.mode == "0644" or reader.mode.startswith("0")
        async for chunk in reader:
            assert len(chunk) <= CHUNK_SIZE
            chunks.append(chunk)
        assert not reader.truncated
    assert b"".join(chunks) == data
    assert len(chunks) > 1


async def test_read_stream_stopped_early(client: AgentClient, workdir: Path) -> None:
    path = workdir / "big"
    path.write_bytes(b"z" * (40 * CHUNK_SIZE))
    async with client.read_file_stream(str(path)) as reader:
        first = await anext(reader)
        assert first
    # The agent is still healthy afterwards.
    assert (await client.exec(["true"])).ok


async def test_read_errors(client: AgentClient, workdir: Path) -> None:
    with pytest.raises(RemoteNotFound):
        await client.read_file(str(workdir / "missing"))
    with pytest.raises(RemoteError):
        await client.read_file(str(workdir))  # a directory


async def test_write_bytes(client: AgentClient, workdir: Path) -> None:
    path = workdir / "out.txt"
    await client.write_file(str(path), b"written\n")
    assert path.read_bytes() == b"written\n"


async def test_write_zero_bytes(client: AgentClient, workdir: Path) -> None:
    path = workdir / "zero"
    await client.write_file(str(path), b"")
    assert path.exists()
    assert path.read_bytes() == b""


async def test_write_large_binary(client: AgentClient, workdir: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = workdir / "large.bin"
    await client.write_file(str(path), data)
    assert path.read_bytes() == data
    back = await client.read_file(str(path))
    assert back.data == data


async def test_write_mode_and_parents(client: AgentClient, workdir: Path) -> None:
    path = workdir / "a" / "b" / "c" / "script.sh"
    await client.write_file(str(path), b"#!/bin/sh\n", mode=0o750)
    assert path.read_bytes() == b"#!/bin/sh\n"
    assert path.stat().st_mode & 0o7777 == 0o750
    await client.write_file(str(path), b"#!/bin/sh\nexit 0\n", mode="0600")
    assert path.stat().st_mode & 0o7777 == 0o600


async def test_write_replaces_existing(client: AgentClient, workdir: Path) -> None:
    path = workdir / "f"
    path.write_bytes(b"old content that is longer")
    await client.write_file(str(path), b"new")
    assert path.read_bytes() == b"new"


async def test_write_from_a_local_file(client: AgentClient, workdir: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = os.urandom(2 * 1024 * 1024 + 5)
    source.write_bytes(data)
    target = workdir / "copy.bin"
    await client.write_file(str(target), source)
    assert target.read_bytes() == data


async def test_write_from_an_async_iterable(client: AgentClient, workdir: Path) -> None:
    parts = [os.urandom(n) for n in (1, 70_000, 0, 200_000, 5)]

    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0)

    target = workdir / "streamed"
    await client.write_file(str(target), gen(), size=sum(map(len, parts)))
    assert target.read_bytes() == b"".join(parts)


async def test_write_size_mismatch_leaves_target_untouched(
    client: AgentClient, workdir: Path
) -> None:
    target = workdir / "keep"
    target.write_bytes(b"original")

    async def short() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(ValueError):
        await client.write_file(str(target), short(), size=10)
    with pytest.raises(ValueError):
        await client.write_file(str(target), short(), size=2)
    await asyncio.sleep(0.2)
    assert target.read_bytes() == b"original"
    assert names_in(workdir) == ["keep"]  # no temporary file left behind


async def test_write_argument_checks(client: AgentClient, workdir: Path) -> None:
    with pytest.raises(TypeError):
        await client.write_file(str(workdir / "x"), "text is ambiguous")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.write_file(str(workdir / "x"), b"abc", size=4)
    with pytest.raises(ValueError):
        await client.write_file(str(workdir / "x"), b"abc", mode="rwx")


async def test_write_into_a_file_as_directory_fails(client: AgentClient, workdir: Path) -> None:
    (workdir / "plain").write_bytes(b"")
    with pytest.raises(RemoteError):
        await client.write_file(str(workdir / "plain" / "child"), b"x")


async def test_stat(client: AgentClient, workdir: Path) -> None:
    path = workdir / "s.txt"
    path.write_bytes(b"12345")
    path.chmod(0o604)
    info = await client.stat(str(path))
    assert info.name == "s.txt"
    assert info.size == 5
    assert info.mode == "0604"
    assert not info.is_dir
    assert abs(info.mtime - path.stat().st_mtime) < 2
    assert info.path in (None, str(path))
    d = await client.stat(str(workdir))
    assert d.is_dir


async def test_stat_missing(client: AgentClient, workdir: Path) -> None:
    with pytest.raises(RemoteNotFound):
        await client.stat(str(workdir / "nope"))


async def test_ls(client: AgentClient, workdir: Path) -> None:
    for name in ("b.txt", "a.txt", "ç.txt"):
        (workdir / name).write_bytes(name.encode())
    (workdir / "sub").mkdir()
    listing = await client.ls(str(workdir))
    names = [e.name for e in listing.entries]
    assert names == sorted(["a.txt", "b.txt", "ç.txt", "sub"])
    assert not listing.truncated
    sub = next(e for e in listing.entries if e.name == "sub")
    assert sub.is_dir
    assert next(e for e in listing.entries if e.name == "a.txt").size == 5


async def test_ls_empty_and_errors(client: AgentClient, workdir: Path) -> None:
    empty = await client.ls(str(workdir))
    assert empty.entries == ()
    (workdir / "file").write_bytes(b"")
    with pytest.raises(RemoteError):
        await client.ls(str(workdir / "file"))
    with pytest.raises(RemoteNotFound):
        await client.ls(str(workdir / "missing"))


async def test_ls_large_directory_is_capped(client: AgentClient, workdir: Path) -> None:
    big = workdir / "many"
    big.mkdir()
    total = LS_LIMIT + 25
    make_links(workdir / "seed", big, total)
    listing = await client.ls(str(big))
    assert listing.truncated
    assert listing.total == total
    assert len(listing.entries) == LS_LIMIT
    assert listing.entries[0].name == "f000000"
