"""``sandbox.files`` of the unmodified ``e2b`` SDK (sync) on a real daemon with real
QEMU microVMs: write (str, bytes, file-like, iterables, several files), read
(text, bytes, stream), list with depth, exists, get_info, make_dir, rename,
remove, watch_dir, users and permissions, and the exceptions of missing paths.

One sandbox serves the module: every test works in a directory of its own.
What the SDK did is checked through kiln's own API too (exec as root).
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import (
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry

from .conftest import E2B_MARKS, E2bDaemon, kiln_exec, make_sandbox

pytestmark = [*E2B_MARKS, pytest.mark.usefixtures("e2b_env")]

HOME = "/home/user"


@pytest.fixture(scope="module")
def sandbox(e2b_daemon: E2bDaemon) -> Iterator[Sandbox]:
    sb = make_sandbox(e2b_daemon, timeout=900)
    try:
        yield sb
    finally:
        sb.kill()


@pytest.fixture
def base(request: pytest.FixtureRequest) -> str:
    """A directory name (relative to the user's home) for one test."""
    return f"t-{request.node.name[:30]}-{secrets.token_hex(2)}"


def sh(api: httpx.Client, sandbox: Sandbox, script: str) -> str:
    return kiln_exec(api, sandbox.sandbox_id, script, user="root")


def test_write_and_read_every_kind_of_data(
    sandbox: Sandbox, base: str, kiln_api: httpx.Client
) -> None:
    info = sandbox.files.write(f"{base}/text.txt", "héllo\nwörld\n")
    assert (info.name, info.path, info.type) == (
        "text.txt",
        f"{HOME}/{base}/text.txt",
        FileType.FILE,
    )
    sandbox.files.write(f"{base}/bytes.bin", bytes(range(256)))
    sandbox.files.write(f"{base}/binary-io", io.BytesIO(b"from a binary file object"))
    sandbox.files.write(f"{base}/text-io", io.StringIO("from a text file object"))
    sandbox.files.write(f"{base}/iterable", iter([b"chunk one, ", b"chunk two"]))
    sandbox.files.write(f"{base}/zipped.txt", "squeeze me " * 1000, gzip=True)
    big = secrets.token_bytes(3 * 1024 * 1024 + 17)
    sandbox.files.write(f"{base}/big", io.BytesIO(big))

    assert sandbox.files.read(f"{base}/text.txt") == "héllo\nwörld\n"
    assert sandbox.files.read(f"{base}/bytes.bin", format="bytes") == bytearray(range(256))
    assert sandbox.files.read(f"{base}/binary-io") == "from a binary file object"
    assert sandbox.files.read(f"{base}/text-io") == "from a text file object"
    assert sandbox.files.read(f"{base}/iterable") == "chunk one, chunk two"
    assert sandbox.files.read(f"{base}/zipped.txt", gzip=True) == "squeeze me " * 1000
    with sandbox.files.read(f"{base}/big", format="stream") as stream:
        assert b"".join(stream) == big
    # Absolute paths too, and the files are the default user's.
    assert (
        sandbox.files.read(f"{HOME}/{base}/text.txt", format="bytes") == "héllo\nwörld\n".encode()
    )
    owners = sh(kiln_api, sandbox, f"stat -c '%U:%G' {HOME}/{base}/big {HOME}/{base}")
    assert owners.split() == ["user:user", "user:user"]


def test_write_files_writes_each_entry(sandbox: Sandbox, base: str) -> None:
    entries: list[WriteEntry] = [
        {"path": f"{base}/one.txt", "data": "1"},
        {"path": f"{base}/sub/two.bin", "data": b"2"},
        {"path": f"/tmp/{base}-three", "data": io.BytesIO(b"3")},
    ]
    infos = sandbox.files.write_files(entries)
    assert [i.path for i in infos] == [
        f"{HOME}/{base}/one.txt",
        f"{HOME}/{base}/sub/two.bin",
        f"/tmp/{base}-three",
    ]
    assert [sandbox.files.read(i.path) for i in infos] == ["1", "2", "3"]
    assert sandbox.files.write_files([]) == []


def test_list_with_depth_and_entry_details(
    sandbox: Sandbox, base: str, kiln_api: httpx.Client
) -> None:
    sandbox.files.write(f"{base}/a/b/deep.txt", "deep")
    sandbox.files.write(f"{base}/top.txt", "12345")
    sh(kiln_api, sandbox, f"cd {HOME}/{base} && ln -s top.txt link && chmod 640 top.txt")

    flat = sandbox.files.list(base)
    assert sorted(e.name for e in flat) == ["a", "link", "top.txt"]
    by_name = {e.name: e for e in flat}
    top = by_name["top.txt"]
    assert top.type == FileType.FILE
    assert top.path == f"{HOME}/{base}/top.txt"
    assert top.size == 5
    assert top.mode == 0o640
    assert top.permissions == "-rw-r-----"
    assert (top.owner, top.group) == ("user", "user")
    assert abs(top.modified_time.timestamp() - time.time()) < 300
    assert top.symlink_target is None
    assert by_name["a"].type == FileType.DIR
    link = by_name["link"]
    assert link.type == FileType.SYMLINK
    assert link.symlink_target == f"{HOME}/{base}/top.txt"

    deep = sandbox.files.list(base, depth=3)
    assert sorted(e.path.removeprefix(f"{HOME}/{base}/") for e in deep) == [
        "a",
        "a/b",
        "a/b/deep.txt",
        "link",
        "top.txt",
    ]
    two = sandbox.files.list(base, depth=2)
    assert "a/b/deep.txt" not in {e.path.removeprefix(f"{HOME}/{base}/") for e in two}
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(base, depth=0)
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{base}/top.txt")  # not a directory


def test_exists_info_make_dir_rename_remove(sandbox: Sandbox, base: str) -> None:
    assert sandbox.files.exists(base) is False
    assert sandbox.files.make_dir(f"{base}/x/y") is True
    assert sandbox.files.make_dir(f"{base}/x/y") is False
    assert sandbox.files.exists(f"{base}/x/y") is True
    info = sandbox.files.get_info(f"{base}/x")
    assert (info.name, info.type, info.path) == ("x", FileType.DIR, f"{HOME}/{base}/x")
    assert info.owner == "user"
    assert info.permissions.startswith("d")

    sandbox.files.write(f"{base}/old.txt", "content")
    renamed = sandbox.files.rename(f"{base}/old.txt", f"{base}/x/new.txt")
    assert (renamed.name, renamed.path) == ("new.txt", f"{HOME}/{base}/x/new.txt")
    assert renamed.type == FileType.FILE and renamed.size == 7
    assert sandbox.files.exists(f"{base}/old.txt") is False
    assert sandbox.files.read(f"{base}/x/new.txt") == "content"

    sandbox.files.remove(f"{base}/x/new.txt")
    assert sandbox.files.exists(f"{base}/x/new.txt") is False
    sandbox.files.remove(f"{base}/x")  # a whole tree
    assert sandbox.files.exists(f"{base}/x") is False
    sandbox.files.remove(f"{base}/never-was")  # as envd: nothing to do is fine


def test_missing_paths_raise_not_found(sandbox: Sandbox, base: str) -> None:
    missing = f"{base}/missing"
    with pytest.raises(NotFoundException):
        sandbox.files.read(missing)
    with pytest.raises(NotFoundException):
        sandbox.files.read(missing, format="stream")
    with pytest.raises(NotFoundException):
        sandbox.files.get_info(missing)
    with pytest.raises(NotFoundException):
        sandbox.files.list(missing)
    with pytest.raises(NotFoundException):
        sandbox.files.rename(missing, f"{base}/elsewhere")
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(missing)


def test_make_dir_over_a_file_is_invalid(sandbox: Sandbox, base: str) -> None:
    sandbox.files.write(f"{base}/plain", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{base}/plain")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(base)  # a directory is not downloadable


def test_permissions_follow_the_user(sandbox: Sandbox, base: str, kiln_api: httpx.Client) -> None:
    name = f"/etc/kiln-{base}"
    with pytest.raises(SandboxException) as denied:
        sandbox.files.write(name, "not yours")
    assert "ermission denied" in str(denied.value)
    with pytest.raises(SandboxException, match="ermission denied"):
        sandbox.files.make_dir(f"{name}.d")
    with pytest.raises(SandboxException, match="ermission denied"):
        sandbox.files.read("/etc/shadow")
    assert sandbox.files.exists(name) is False

    info = sandbox.files.write(name, "root's", user="root")
    assert info.path == name
    assert sandbox.files.get_info(name, user="root").owner == "root"
    assert sandbox.files.read(name) == "root's"  # world-readable: the user may read it
    with pytest.raises(SandboxException, match="ermission denied"):
        sandbox.files.remove(name)
    with pytest.raises(SandboxException, match="ermission denied"):
        sandbox.files.rename(name, f"{HOME}/{base}-stolen")
    sandbox.files.remove(name, user="root")
    assert sandbox.files.exists(name) is False
    # root's relative paths start at /root.
    root_info = sandbox.files.write(f"{base}.txt", "r", user="root")
    assert root_info.path == f"/root/{base}.txt"
    assert sh(kiln_api, sandbox, f"stat -c %U /root/{base}.txt").strip() == "root"


def _events_until(handle: Any, wanted: set[tuple[str, Any]], within: float = 20) -> list[Any]:
    seen: list[Any] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        seen += handle.get_new_events()
        if wanted <= {(e.name, e.type) for e in seen}:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"wanted {wanted}, saw {[(e.name, e.type) for e in seen]}")


def test_watch_dir_reports_files_writes_and_commands(sandbox: Sandbox, base: str) -> None:
    sandbox.files.make_dir(base)
    handle = sandbox.files.watch_dir(base)
    try:
        sandbox.files.write(f"{base}/from-files.txt", "x")
        _events_until(
            handle,
            {
                ("from-files.txt", FilesystemEventType.CREATE),
                ("from-files.txt", FilesystemEventType.WRITE),
            },
        )
        script = "echo hi > cmd.txt && chmod 600 cmd.txt && mv cmd.txt moved.txt && rm moved.txt"
        assert sandbox.commands.run(script, cwd=f"{HOME}/{base}").exit_code == 0
        _events_until(
            handle,
            {
                ("cmd.txt", FilesystemEventType.CREATE),
                ("cmd.txt", FilesystemEventType.WRITE),
                ("cmd.txt", FilesystemEventType.CHMOD),
                ("cmd.txt", FilesystemEventType.RENAME),
                ("moved.txt", FilesystemEventType.CREATE),
                ("moved.txt", FilesystemEventType.REMOVE),
            },
        )
    finally:
        handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()  # stopped


def test_recursive_watch(sandbox: Sandbox, base: str) -> None:
    sandbox.files.make_dir(f"{base}/inner")
    handle = sandbox.files.watch_dir(base, recursive=True)
    try:
        sandbox.files.write(f"{base}/inner/deep.txt", "x")
        _events_until(handle, {("inner/deep.txt", FilesystemEventType.WRITE)})
    finally:
        handle.stop()
