"""File read/write/stat/ls against a real test-mode agent (plus the pure truncation logic)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.guest.files import TEMP_PREFIX, truncate_blocks
from kiln.protocol import CHUNK_SIZE, LS_LIMIT, FrameType, decode_exit

from ._wire import Conn, request, run, wait_for
from .conftest import Guest

UNICODE_NAME = "héllo wörld 世界 🚀.txt"


async def read(agent: Any, path: str | Path, **limits: int) -> tuple[dict[str, Any], bytes]:
    """FILE_READ: (FILE_READ_RESP, content) after checking the frame sequence."""
    async with await Conn.open(agent.control, agent.token) as conn:
        await conn.send_json(FrameType.FILE_READ_REQ, {"path": str(path), **limits})
        header = await conn.expect_json(FrameType.FILE_READ_RESP)
        content = b""
        while True:
            frame = await conn.recv()
            assert frame is not None
            if frame.type == FrameType.EXIT:
                assert decode_exit(frame.payload) == 0
                return header, content
            assert frame.type == FrameType.STDOUT, frame
            assert 0 < len(frame.payload) <= CHUNK_SIZE
            content += frame.payload


async def read_error(agent: Any, path: str | Path) -> str:
    async with await Conn.open(agent.control, agent.token) as conn:
        await conn.send_json(FrameType.FILE_READ_REQ, {"path": str(path)})
        return await conn.expect_error()


async def write(
    agent: Any, path: str | Path, data: bytes, mode: str | None = None, chunk: int = 65536
) -> dict[str, Any]:
    async with await Conn.open(agent.control, agent.token) as conn:
        req: dict[str, Any] = {"path": str(path), "size": len(data)}
        if mode is not None:
            req["mode"] = mode
        await conn.send_json(FrameType.FILE_WRITE_REQ, req)
        for i in range(0, len(data), chunk):
            await conn.send(FrameType.STDIN, data[i : i + chunk])
        answer: dict[str, Any] = await conn.expect_json(FrameType.FILE_WRITE_RESP)
        return answer


def reference_truncate(data: bytes, offset: int = 0, limit: int = 0, max_bytes: int = 0) -> bytes:
    lines = data.splitlines(keepends=True)
    lines = lines[max(offset - 1, 0) :]
    if limit:
        lines = lines[:limit]
    out = b"".join(lines)
    return out[:max_bytes] if max_bytes else out


# ---- read ------------------------------------------------------------------------


async def test_read_normal(guest: Guest, workdir: Path) -> None:
    (workdir / "a.txt").write_bytes(b"hello\nworld\n")
    (workdir / "a.txt").chmod(0o640)
    header, content = await read(guest, workdir / "a.txt")
    assert header == {"size": 12, "mode": "0640"}
    assert content == b"hello\nworld\n"


async def test_read_empty(guest: Guest, workdir: Path) -> None:
    (workdir / "empty").write_bytes(b"")
    header, content = await read(guest, workdir / "empty")
    assert header["size"] == 0
    assert content == b""


async def test_read_binary(guest: Guest, workdir: Path) -> None:
    data = bytes(range(256)) * 1000 + os.urandom(100_001)
    (workdir / "bin").write_bytes(data)
    header, content = await read(guest, workdir / "bin")
    assert header["size"] == len(data)
    assert content == data


async def test_unicode_file_names(guest: Guest, workdir: Path) -> None:
    (workdir / UNICODE_NAME).write_text("ünïcode ✓")
    _header, content = await read(guest, workdir / UNICODE_NAME)
    assert content.decode() == "ünïcode ✓"
    assert await write(guest, workdir / ("new " + UNICODE_NAME), b"x") == {"status": "ok"}
    listing = json.loads(
        (await request(guest, FrameType.FILE_LS_REQ, {"path": str(workdir)})).payload
    )
    assert [e["name"] for e in listing] == sorted([UNICODE_NAME, "new " + UNICODE_NAME])
    info = json.loads(
        (
            await request(guest, FrameType.FILE_STAT_REQ, {"path": str(workdir / UNICODE_NAME)})
        ).payload
    )
    assert info["name"] == UNICODE_NAME


async def test_read_relative_path_resolves_against_workdir(guest: Guest, workdir: Path) -> None:
    (workdir / "rel").write_bytes(b"relative")
    _header, content = await read(guest, f"{workdir.name}/rel")
    assert content == b"relative"


LINES = b"".join(f"line {i} {'x' * (i % 50)}\n".encode() for i in range(1, 3001)) + b"no newline"


@pytest.mark.parametrize(
    ("offset", "limit", "max_bytes"),
    [
        (0, 0, 0),
        (1, 0, 0),
        (10, 0, 0),
        (0, 5, 0),
        (0, 0, 100),
        (2999, 0, 0),  # spans past the last full line into the unterminated one
        (3001, 0, 0),  # only the last, unterminated line
        (5000, 0, 0),  # past the end
        (100, 20, 0),
        (100, 20, 50),  # bytes hit first
        (100, 2, 10_000),  # lines hit first
        (0, 0, 70_000),  # across a 64 KiB block boundary
        (1500, 1000, 0),
    ],
)
async def test_read_truncation(
    guest: Guest, workdir: Path, offset: int, limit: int, max_bytes: int
) -> None:
    (workdir / "lines").write_bytes(LINES)
    header, content = await read(
        guest, workdir / "lines", offset=offset, limit=limit, max_bytes=max_bytes
    )
    assert header["size"] == len(LINES)  # the size of the file, not of what is sent
    assert content == reference_truncate(LINES, offset, limit, max_bytes)


def test_truncation_over_any_block_split() -> None:
    rng = random.Random(7)
    data = b"".join(rng.choice([b"\n", b"ab\n", b"c", b"\n\n", b"defg"]) for _ in range(400))
    for _ in range(300):
        size = rng.randint(1, 40)
        blocks = iter([data[i : i + size] for i in range(0, len(data), size)])
        offset, limit, max_bytes = rng.randint(0, 60), rng.randint(0, 30), rng.randint(0, 200)
        got = b"".join(truncate_blocks(blocks, offset=offset, limit=limit, max_bytes=max_bytes))
        assert got == reference_truncate(data, offset, limit, max_bytes), (size, offset, limit)


async def test_read_missing_is_an_error(guest: Guest, workdir: Path) -> None:
    assert "No such file" in await read_error(guest, workdir / "missing")


async def test_read_directory_is_an_error(guest: Guest, workdir: Path) -> None:
    assert "directory" in await read_error(guest, workdir)


async def test_read_fifo_is_an_error_and_does_not_hang(guest: Guest, workdir: Path) -> None:
    os.mkfifo(workdir / "fifo")
    assert "regular" in await read_error(guest, workdir / "fifo")


async def test_read_stops_when_the_host_closes(guest: Guest, workdir: Path) -> None:
    (workdir / "big").write_bytes(os.urandom(20 * 1024 * 1024))
    conn = await Conn.open(guest.control, guest.token)
    await conn.send_json(FrameType.FILE_READ_REQ, {"path": str(workdir / "big")})
    await conn.expect(FrameType.FILE_READ_RESP)
    await conn.expect(FrameType.STDOUT)
    await conn.close()
    assert (await run(guest, ["true"])).code == 0


# ---- write -----------------------------------------------------------------------


async def test_write_normal(guest: Guest, workdir: Path) -> None:
    data = os.urandom(300_000)
    assert await write(guest, workdir / "out.bin", data, chunk=70_000) == {"status": "ok"}
    assert (workdir / "out.bin").read_bytes() == data
    assert (workdir / "out.bin").stat().st_mode & 0o7777 == 0o644


async def test_durable_write(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--sync"])  # fsync file and directory, as in a VM
    target = agent.workdir / "durable" / "file"
    assert await write(agent, target, b"on disk", mode="0640") == {"status": "ok"}
    assert target.read_bytes() == b"on disk"
    assert target.stat().st_mode & 0o7777 == 0o640


async def test_write_zero_bytes(guest: Guest, workdir: Path) -> None:
    assert await write(guest, workdir / "zero", b"") == {"status": "ok"}
    assert (workdir / "zero").read_bytes() == b""


@pytest.mark.parametrize("mode", ["0600", "0755", "0444"])
async def test_write_permissions(guest: Guest, workdir: Path, mode: str) -> None:
    await write(guest, workdir / "m", b"data", mode=mode)
    assert (workdir / "m").stat().st_mode & 0o7777 == int(mode, 8)


async def test_overwrite_keeps_the_mode_unless_given(guest: Guest, workdir: Path) -> None:
    (workdir / "f").write_bytes(b"old")
    (workdir / "f").chmod(0o700)
    await write(guest, workdir / "f", b"new")
    assert (workdir / "f").read_bytes() == b"new"
    assert (workdir / "f").stat().st_mode & 0o7777 == 0o700


async def test_write_creates_parent_directories(guest: Guest, workdir: Path) -> None:
    await write(guest, workdir / "a" / "b" / "c.txt", b"deep")
    assert (workdir / "a" / "b" / "c.txt").read_bytes() == b"deep"


async def test_write_negative_or_missing_size_is_an_error(guest: Guest, workdir: Path) -> None:
    (workdir / "keep").write_bytes(b"untouched")
    for req in ({"path": str(workdir / "keep"), "size": -1}, {"path": str(workdir / "keep")}):
        async with await Conn.open(guest.control, guest.token) as conn:
            await conn.send_json(FrameType.FILE_WRITE_REQ, req)
            assert "size" in await conn.expect_error()
    assert (workdir / "keep").read_bytes() == b"untouched"


async def test_write_more_than_size_is_an_error(guest: Guest, workdir: Path) -> None:
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send_json(FrameType.FILE_WRITE_REQ, {"path": str(workdir / "x"), "size": 3})
        await conn.send(FrameType.STDIN, b"toolong")
        await conn.expect_error()
    assert not (workdir / "x").exists()
    assert not [p for p in os.listdir(workdir) if p.startswith(TEMP_PREFIX)]


async def test_drop_mid_write_leaves_target_untouched(guest: Guest, workdir: Path) -> None:
    target = workdir / "target"
    target.write_bytes(b"original")
    conn = await Conn.open(guest.control, guest.token)
    await conn.send_json(FrameType.FILE_WRITE_REQ, {"path": str(target), "size": 1000})
    await conn.send(FrameType.STDIN, b"partial" * 10)

    def temp_files() -> list[str]:
        return [p for p in os.listdir(workdir) if p.startswith(TEMP_PREFIX)]

    await wait_for(lambda: bool(temp_files()))  # the write is under way
    await conn.close()
    await wait_for(lambda: not temp_files())
    assert target.read_bytes() == b"original"
    assert sorted(os.listdir(workdir)) == ["target"]


async def test_write_is_atomic_for_concurrent_readers(guest: Guest, workdir: Path) -> None:
    size = 256 * 1024
    versions = [bytes([65 + i]) * size for i in range(4)]  # AAAA…, BBBB…, …
    target = workdir / "atomic"
    target.write_bytes(versions[0])
    seen: list[bytes] = []

    async def writer() -> None:
        for i in range(12):
            await write(guest, target, versions[(i + 1) % 4], chunk=32 * 1024)

    async def reader() -> None:
        for _ in range(15):
            _header, content = await read(guest, target)
            seen.append(content)

    await asyncio.gather(writer(), reader(), reader(), reader())
    assert len(seen) == 45
    for content in seen:
        assert content in versions, "a reader saw a mix of two versions"


async def test_write_under_a_file_is_an_error(guest: Guest, workdir: Path) -> None:
    (workdir / "file").write_bytes(b"")
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send_json(
            FrameType.FILE_WRITE_REQ, {"path": str(workdir / "file" / "x"), "size": 1}
        )
        await conn.expect_error()


# ---- stat / ls -------------------------------------------------------------------


async def stat(agent: Any, path: str | Path) -> Any:
    frame = await request(agent, FrameType.FILE_STAT_REQ, {"path": str(path)})
    if frame.type == FrameType.ERROR:
        return frame.payload.decode()
    assert frame.type == FrameType.FILE_STAT_RESP
    return json.loads(frame.payload)


async def ls(agent: Any, path: str | Path) -> Any:
    frame = await request(agent, FrameType.FILE_LS_REQ, {"path": str(path)})
    if frame.type == FrameType.ERROR:
        return frame.payload.decode()
    assert frame.type == FrameType.FILE_LS_RESP
    return json.loads(frame.payload)


async def test_stat_regular_file(guest: Guest, workdir: Path) -> None:
    (workdir / "s.txt").write_bytes(b"12345")
    (workdir / "s.txt").chmod(0o600)
    info = await stat(guest, workdir / "s.txt")
    assert info["name"] == "s.txt" and info["path"] == str(workdir / "s.txt")
    assert info["size"] == 5 and info["mode"] == "0600" and info["is_dir"] is False
    assert abs(info["mtime"] - (workdir / "s.txt").stat().st_mtime) < 1e-3


async def test_stat_directory(guest: Guest, workdir: Path) -> None:
    info = await stat(guest, workdir)
    assert info["is_dir"] is True and info["name"] == workdir.name


async def test_stat_missing_is_an_error(guest: Guest, workdir: Path) -> None:
    assert "No such file" in await stat(guest, workdir / "missing")


async def test_ls_normal(guest: Guest, workdir: Path) -> None:
    (workdir / "b.txt").write_bytes(b"bb")
    (workdir / "a.txt").write_bytes(b"a")
    (workdir / "c").mkdir()
    entries = await ls(guest, workdir)
    assert [e["name"] for e in entries] == ["a.txt", "b.txt", "c"]
    assert [e["is_dir"] for e in entries] == [False, False, True]
    assert [e["size"] for e in entries[:2]] == [1, 2]
    assert all(set(e) == {"name", "size", "mode", "is_dir", "mtime"} for e in entries)


async def test_ls_empty_directory(guest: Guest, workdir: Path) -> None:
    assert await ls(guest, workdir) == []


async def test_ls_non_directory_is_an_error(guest: Guest, workdir: Path) -> None:
    (workdir / "f").write_bytes(b"")
    assert "directory" in (await ls(guest, workdir / "f")).lower()
    assert "No such file" in await ls(guest, workdir / "missing")


async def test_ls_large_directory_is_capped_with_a_sentinel(guest: Guest, workdir: Path) -> None:
    total = LS_LIMIT + 50
    # Hard links: creating 10k inodes takes seconds on some file systems, links do not.
    (workdir / "f00000").touch()
    for i in range(1, total):
        os.link(workdir / "f00000", workdir / f"f{i:05d}")
    entries = await ls(guest, workdir)
    assert len(entries) == LS_LIMIT + 1
    assert entries[-1] == {"name": "...", "truncated": True, "total": total}
    names = [e["name"] for e in entries[:-1]]
    assert names == [f"f{i:05d}" for i in range(LS_LIMIT)]


async def test_ls_with_long_names_stays_within_one_frame(guest: Guest, workdir: Path) -> None:
    total = 5000
    (workdir / "seed").touch()
    for i in range(total - 1):
        os.link(workdir / "seed", workdir / f"{i:05d}{'n' * 240}")
    entries = await ls(guest, workdir)  # 5000 such entries would be ~1.7 MB of JSON
    assert entries[-1] == {"name": "...", "truncated": True, "total": total}
    names = [e["name"] for e in entries[:-1]]
    assert 1000 < len(names) < total
    assert names == sorted(os.listdir(workdir))[: len(names)]


async def test_write_through_a_symlink_keeps_the_link(guest: Guest, workdir: Path) -> None:
    (workdir / "real").write_bytes(b"old")
    (workdir / "link").symlink_to("real")
    await write(guest, workdir / "link", b"new")
    assert (workdir / "link").is_symlink()
    assert (workdir / "real").read_bytes() == b"new"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a file to another uid")
async def test_overwrite_keeps_the_owner(guest: Guest, workdir: Path) -> None:
    (workdir / "owned").write_bytes(b"old")
    os.chown(workdir / "owned", 12345, 12346)
    await write(guest, workdir / "owned", b"new")
    st = (workdir / "owned").stat()
    assert (st.st_uid, st.st_gid) == (12345, 12346)
