"""mkdir, move, remove, watch and the user/details/depth extensions, on the wire,
against a real test-mode agent (running as root here, like a VM's PID 1)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from kiln.protocol import FrameType, decode_exit

from ._wire import Conn, request
from .conftest import Guest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a user needs root")
NOBODY = "nobody"


async def answer(guest: Guest, ftype: int, expect: int, payload: dict[str, Any]) -> Any:
    """The JSON answer of type ``expect``, or the ERROR text."""
    frame = await request(guest, ftype, payload)
    if frame.type == FrameType.ERROR:
        return frame.payload.decode()
    assert frame.type == expect, frame
    return json.loads(frame.payload)


async def mkdir(guest: Guest, path: Path | str, **fields: Any) -> Any:
    payload = {"path": str(path), **fields}
    return await answer(guest, FrameType.FILE_MKDIR_REQ, FrameType.FILE_MKDIR_RESP, payload)


async def move(guest: Guest, source: Path | str, destination: Path | str, **fields: Any) -> Any:
    payload = {"source": str(source), "destination": str(destination), **fields}
    return await answer(guest, FrameType.FILE_MOVE_REQ, FrameType.FILE_MOVE_RESP, payload)


async def remove(guest: Guest, path: Path | str, **fields: Any) -> Any:
    payload = {"path": str(path), **fields}
    return await answer(guest, FrameType.FILE_REMOVE_REQ, FrameType.FILE_REMOVE_RESP, payload)


def open_to(path: Path, user: str = NOBODY) -> Path:
    """Make ``path`` (a directory) the user's, and its parents enterable."""
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for parent in path.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    return path


# ---- mkdir -----------------------------------------------------------------------


async def test_mkdir_creates_then_reports_existing(guest: Guest, workdir: Path) -> None:
    target = workdir / "a" / "b"
    first = await mkdir(guest, target, mode="0750")
    assert first["created"] is True
    assert first["info"]["is_dir"] is True
    assert first["info"]["path"] == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert (workdir / "a").is_dir()
    second = await mkdir(guest, target)
    assert second["created"] is False


async def test_mkdir_errors(guest: Guest, workdir: Path) -> None:
    (workdir / "file").write_text("x")
    assert "File exists" in await mkdir(guest, workdir / "file")
    missing = await mkdir(guest, workdir / "no" / "dir", parents=False)
    assert "No such file or directory" in missing
    assert "Not a directory" in await mkdir(guest, workdir / "file" / "sub")
    assert not (workdir / "no").exists()


@needs_root
async def test_mkdir_as_user_owns_and_is_refused_where_not_allowed(
    guest: Guest, workdir: Path
) -> None:
    refused = await mkdir(guest, workdir / "theirs", user=NOBODY)
    assert "Permission denied" in refused
    assert not (workdir / "theirs").exists()
    (workdir / "mine").mkdir()
    mine = open_to(workdir / "mine")
    made = await mkdir(guest, mine / "x" / "y", user=NOBODY)
    assert made["created"] is True
    uid = pwd.getpwnam(NOBODY).pw_uid
    assert (mine / "x").stat().st_uid == uid
    assert (mine / "x" / "y").stat().st_uid == uid


# ---- move ------------------------------------------------------------------------


async def test_move_across_directories_creating_parents(guest: Guest, workdir: Path) -> None:
    (workdir / "src.txt").write_text("payload")
    info = await move(guest, workdir / "src.txt", workdir / "new" / "dst.txt")
    assert info["path"] == str(workdir / "new" / "dst.txt")
    assert info["name"] == "dst.txt"
    assert info["size"] == 7
    assert (workdir / "new" / "dst.txt").read_text() == "payload"
    assert not (workdir / "src.txt").exists()


async def test_move_refuses_to_overwrite_unless_asked(guest: Guest, workdir: Path) -> None:
    (workdir / "a").write_text("a")
    (workdir / "b").write_text("b")
    refused = await move(guest, workdir / "a", workdir / "b")
    assert "File exists" in refused
    assert (workdir / "a").read_text() == "a"
    assert (workdir / "b").read_text() == "b"
    await move(guest, workdir / "a", workdir / "b", overwrite=True)
    assert (workdir / "b").read_text() == "a"
    assert not (workdir / "a").exists()


async def test_move_errors(guest: Guest, workdir: Path) -> None:
    assert "No such file or directory" in await move(guest, workdir / "none", workdir / "x")
    (workdir / "d").mkdir()
    assert "into itself" in await move(guest, workdir / "d", workdir / "d" / "inner")
    assert (workdir / "d").is_dir()


@needs_root
async def test_move_as_user_in_root_directory_is_denied(guest: Guest, workdir: Path) -> None:
    (workdir / "root-owned").write_text("r")
    refused = await move(guest, workdir / "root-owned", workdir / "moved", user=NOBODY)
    assert "Permission denied" in refused
    assert (workdir / "root-owned").exists()


# ---- remove ----------------------------------------------------------------------


async def test_remove_file_link_and_trees(guest: Guest, workdir: Path) -> None:
    (workdir / "f").write_text("x")
    (workdir / "target").write_text("keep")
    (workdir / "link").symlink_to(workdir / "target")
    (workdir / "tree" / "deep").mkdir(parents=True)
    (workdir / "tree" / "deep" / "file").write_text("x")
    (workdir / "empty").mkdir()
    assert await remove(guest, workdir / "f") == {"status": "ok"}
    assert await remove(guest, workdir / "link") == {"status": "ok"}
    assert (workdir / "target").read_text() == "keep"  # the link went, not its target
    assert await remove(guest, workdir / "empty") == {"status": "ok"}
    assert "Directory not empty" in await remove(guest, workdir / "tree")
    assert await remove(guest, workdir / "tree", recursive=True) == {"status": "ok"}
    assert sorted(os.listdir(workdir)) == ["target"]


async def test_remove_errors(guest: Guest, workdir: Path) -> None:
    assert "No such file or directory" in await remove(guest, workdir / "missing")
    assert "refusing" in await remove(guest, "/", recursive=True)
    assert "refusing" in await remove(guest, "/tmp/..", recursive=True)


@needs_root
async def test_remove_as_user_is_denied_in_a_root_directory(guest: Guest, workdir: Path) -> None:
    (workdir / "precious").write_text("x")
    assert "Permission denied" in await remove(guest, workdir / "precious", user=NOBODY)
    assert (workdir / "precious").exists()


# ---- stat / ls extensions ----------------------------------------------------------


async def test_stat_details(guest: Guest, workdir: Path) -> None:
    (workdir / "file").write_bytes(b"12345")
    (workdir / "file").chmod(0o640)
    (workdir / "link").symlink_to(workdir / "file")
    plain = await answer(
        guest, FrameType.FILE_STAT_REQ, FrameType.FILE_STAT_RESP, {"path": str(workdir / "file")}
    )
    assert set(plain) == {"name", "size", "mode", "is_dir", "mtime", "path"}
    info = await answer(
        guest,
        FrameType.FILE_STAT_REQ,
        FrameType.FILE_STAT_RESP,
        {"path": str(workdir / "link"), "details": True},
    )
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert info["type"] == "file"
    assert info["symlink"] is True
    assert info["target"] == str(workdir / "file")
    assert info["size"] == 5
    assert info["mode"] == "0640"
    assert info["permissions"] == "-rw-r-----"
    assert (info["owner"], info["uid"]) == (me, os.geteuid())
    assert isinstance(info["group"], str)


async def test_ls_depth_and_details(guest: Guest, workdir: Path) -> None:
    (workdir / "a" / "b" / "c").mkdir(parents=True)
    (workdir / "a" / "b" / "c" / "too-deep").write_text("x")
    (workdir / "a" / "file").write_text("x")
    (workdir / "z").write_text("x")
    (workdir / "dangling").symlink_to(workdir / "nowhere")
    (workdir / "dirlink").symlink_to(workdir / "a")
    listing = await answer(
        guest,
        FrameType.FILE_LS_REQ,
        FrameType.FILE_LS_RESP,
        {"path": str(workdir), "depth": 2, "details": True},
    )
    paths = {e["path"][len(str(workdir)) + 1 :]: e for e in listing}
    assert set(paths) == {"a", "a/b", "a/file", "z", "dangling", "dirlink"}
    assert paths["a"]["type"] == "dir"
    assert paths["a/b"]["type"] == "dir"
    assert paths["dangling"]["type"] == "symlink"
    assert paths["dirlink"]["symlink"] is True  # listed, not entered
    assert paths["dirlink"]["type"] == "dir"
    assert paths["z"]["permissions"].startswith("-")


async def test_ls_depth_one_is_the_plain_listing_plus_paths(guest: Guest, workdir: Path) -> None:
    (workdir / "d").mkdir()
    (workdir / "d" / "inner").write_text("x")
    listing = await answer(
        guest, FrameType.FILE_LS_REQ, FrameType.FILE_LS_RESP, {"path": str(workdir), "depth": 1}
    )
    assert [(e["name"], e["path"]) for e in listing] == [("d", str(workdir / "d"))]
    bad = await answer(
        guest, FrameType.FILE_LS_REQ, FrameType.FILE_LS_RESP, {"path": str(workdir), "depth": 0}
    )
    assert "depth" in bad


# ---- read / write as a user --------------------------------------------------------


@needs_root
async def test_write_as_user_is_theirs_and_respects_permissions(
    guest: Guest, workdir: Path
) -> None:
    async def write(path: Path, data: bytes) -> Any:
        async with await Conn.open(guest.control, guest.token) as conn:
            req = {"path": str(path), "size": len(data), "user": NOBODY}
            await conn.send(FrameType.FILE_WRITE_REQ, json.dumps(req).encode())
            await conn.send(FrameType.STDIN, data)
            frame = await conn.recv()
            assert frame is not None
            return frame.payload.decode() if frame.type == FrameType.ERROR else frame.type

    entry = pwd.getpwnam(NOBODY)
    (workdir / "theirs").mkdir()
    open_to(workdir / "theirs")
    assert await write(workdir / "theirs" / "sub" / "f.txt", b"hi") == FrameType.FILE_WRITE_RESP
    written = workdir / "theirs" / "sub" / "f.txt"
    assert written.read_bytes() == b"hi"
    assert (written.stat().st_uid, written.stat().st_gid) == (entry.pw_uid, entry.pw_gid)
    assert (written.parent.stat().st_uid) == entry.pw_uid
    assert "Permission denied" in await write(workdir / "denied.txt", b"no")
    assert not (workdir / "denied.txt").exists()
    # A root-owned read-only file in the user's own directory: not theirs to replace.
    locked = workdir / "theirs" / "locked"
    locked.write_text("root's")
    locked.chmod(0o644)
    assert "Permission denied" in await write(locked, b"mine now")
    assert locked.read_text() == "root's"


@needs_root
async def test_read_and_stat_as_user(guest: Guest, workdir: Path) -> None:
    secret = workdir / "secret"
    secret.write_text("s")
    secret.chmod(0o600)
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(
            FrameType.FILE_READ_REQ, json.dumps({"path": str(secret), "user": NOBODY}).encode()
        )
        assert "Permission denied" in await conn.expect_error()
    public = workdir / "public"
    public.write_text("p")
    public.chmod(0o644)
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(
            FrameType.FILE_READ_REQ, json.dumps({"path": str(public), "user": NOBODY}).encode()
        )
        await conn.expect(FrameType.FILE_READ_RESP)
        data = await conn.expect(FrameType.STDOUT)
        assert data.payload == b"p"
    hidden = workdir / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "f").write_text("x")
    info = await answer(
        guest,
        FrameType.FILE_STAT_REQ,
        FrameType.FILE_STAT_RESP,
        {"path": str(hidden / "f"), "user": NOBODY},
    )
    assert "Permission denied" in info


async def test_unknown_user_is_a_clear_error(guest: Guest, workdir: Path) -> None:
    got = await mkdir(guest, workdir / "x", user="kiln-no-such-user")
    assert "unknown user" in got


# ---- watch -----------------------------------------------------------------------


class Watcher:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    @classmethod
    async def start(cls, guest: Guest, path: Path, **fields: Any) -> Watcher:
        conn = await Conn.open(guest.control, guest.token)
        await conn.send_json(FrameType.FILE_WATCH_REQ, {"path": str(path), **fields})
        assert await conn.expect_json(FrameType.FILE_WATCH_RESP) == {"status": "ok"}
        return cls(conn)

    async def until(self, wanted: tuple[str, str]) -> list[tuple[str, str]]:
        """Events up to and including ``wanted``."""
        seen: list[tuple[str, str]] = []
        while True:
            event = await self.conn.expect_json(FrameType.FILE_EVENT, within=5)
            seen.append((event["name"], event["type"]))
            if seen[-1] == wanted:
                return seen


async def test_watch_reports_changes_as_e2b_does(guest: Guest, workdir: Path) -> None:
    (workdir / "existing").write_text("old")
    watcher = await Watcher.start(guest, workdir)
    try:
        # kiln's own (atomic) write of a new file: create + write, no temporary file.
        async with await Conn.open(guest.control, guest.token) as conn:
            await conn.send_json(FrameType.FILE_WRITE_REQ, {"path": str(workdir / "n"), "size": 1})
            await conn.send(FrameType.STDIN, b"x")
            await conn.expect(FrameType.FILE_WRITE_RESP)
        assert await watcher.until(("n", "write")) == [("n", "create"), ("n", "write")]
        # ... and of an existing one: just write.
        async with await Conn.open(guest.control, guest.token) as conn:
            req = {"path": str(workdir / "existing"), "size": 3}
            await conn.send_json(FrameType.FILE_WRITE_REQ, req)
            await conn.send(FrameType.STDIN, b"new")
            await conn.expect(FrameType.FILE_WRITE_RESP)
        assert await watcher.until(("existing", "write")) == [("existing", "write")]
        fd = os.open(workdir / "existing", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"more")  # in place, as an editor appending would
        os.close(fd)
        assert await watcher.until(("existing", "write")) == [("existing", "write")]
        (workdir / "existing").chmod(0o600)
        assert await watcher.until(("existing", "chmod")) == [("existing", "chmod")]
        (workdir / "existing").rename(workdir / "renamed")
        assert await watcher.until(("renamed", "create")) == [
            ("existing", "rename"),
            ("renamed", "create"),
        ]
        (workdir / "renamed").unlink()
        assert await watcher.until(("renamed", "remove")) == [("renamed", "remove")]
        # Not recursive: nothing from inside a subdirectory.
        (workdir / "sub").mkdir()
        (workdir / "sub" / "inner").write_text("x")
        (workdir / "after").write_text("x")
        events = await watcher.until(("after", "create"))
        assert ("sub", "create") in events
        assert all(not name.startswith("sub/") for name, _ in events)
    finally:
        await watcher.conn.close()


async def test_recursive_watch_and_the_end_of_the_directory(guest: Guest, workdir: Path) -> None:
    root = workdir / "watched"
    (root / "old").mkdir(parents=True)
    watcher = await Watcher.start(guest, root, recursive=True)
    try:
        (root / "old" / "f").write_text("x")
        assert await watcher.until(("old/f", "write")) == [("old/f", "create"), ("old/f", "write")]
        (root / "new").mkdir()
        await watcher.until(("new", "create"))
        await asyncio.sleep(0.1)  # the agent adds the new directory's watch
        (root / "new" / "g").write_text("y")
        assert ("new/g", "create") in await watcher.until(("new/g", "write"))
        shutil.rmtree(root)
        while True:
            frame = await watcher.conn.recv(5)
            assert frame is not None
            if frame.type == FrameType.EXIT:
                assert decode_exit(frame.payload) == 0
                break
            assert frame.type == FrameType.FILE_EVENT
        await watcher.conn.expect_closed()
    finally:
        await watcher.conn.close()


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_watch_ends_when_the_host_goes_away(guest: Guest, workdir: Path) -> None:
    before = _fd_count(guest.pid)
    for _ in range(5):
        watcher = await Watcher.start(guest, workdir)
        await watcher.conn.close()
    for _ in range(100):
        if _fd_count(guest.pid) <= before:
            break
        await asyncio.sleep(0.02)
    assert _fd_count(guest.pid) <= before  # inotify fds and sockets are all gone


async def test_watch_errors(guest: Guest, workdir: Path) -> None:
    (workdir / "file").write_text("x")
    for path, reason in (
        (workdir / "missing", "No such file or directory"),
        (workdir / "file", "Not a directory"),
    ):
        async with await Conn.open(guest.control, guest.token) as conn:
            await conn.send_json(FrameType.FILE_WATCH_REQ, {"path": str(path)})
            assert reason in await conn.expect_error()


async def test_a_watch_keeps_the_sandbox_active(guest: Guest, workdir: Path) -> None:
    async def attached() -> int:
        frame = await request(guest, FrameType.ACTIVITY_REQ)
        assert frame.type == FrameType.ACTIVITY_RESP
        return int(json.loads(frame.payload)["attached_sessions"])

    before = await attached()
    watcher = await Watcher.start(guest, workdir)
    try:
        assert await attached() == before + 1
    finally:
        await watcher.conn.close()
    for _ in range(100):
        if await attached() == before:
            break
        await asyncio.sleep(0.02)
    assert await attached() == before


@needs_root
async def test_a_users_recursive_watch_skips_what_they_may_not_read(
    guest: Guest, workdir: Path
) -> None:
    (workdir / "open").mkdir()
    (workdir / "private").mkdir(mode=0o700)
    for path in (workdir, workdir / "open"):
        path.chmod(0o755)
    open_to(workdir)
    watcher = await Watcher.start(guest, workdir, recursive=True, user=NOBODY)
    try:
        (workdir / "private" / "secret").write_text("x")
        (workdir / "open" / "seen").write_text("x")
        events = await watcher.until(("open/seen", "write"))
        assert all(not name.startswith("private/") for name, _ in events)
    finally:
        await watcher.conn.close()
