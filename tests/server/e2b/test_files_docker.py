"""``sandbox.files`` of the ``e2b`` SDK on the Docker engine (the QEMU engine's are in
test_files.py): the agent in a container acts as the SDK's user there too."""

from __future__ import annotations

import time

import pytest
from e2b import FilesystemEventType, Sandbox, SandboxException

from .conftest import E2B_MARKS, E2bDaemon, kiln_exec

pytestmark = E2B_MARKS


def test_files_on_docker(e2b_docker_daemon: E2bDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in e2b_docker_daemon.env().items():
        monkeypatch.setenv(name, value)
    sb = Sandbox.create()
    try:
        info = sb.files.write("notes/a.txt", "in a container")
        assert info.path == "/home/user/notes/a.txt"
        assert sb.files.read("notes/a.txt") == "in a container"
        entry = sb.files.get_info("notes/a.txt")
        assert (entry.owner, entry.group, entry.size) == ("user", "user", 14)
        with e2b_docker_daemon.api() as api:
            owners = kiln_exec(
                api, sb.sandbox_id, "stat -c %U:%G /home/user/notes /home/user/notes/a.txt", "root"
            )
        assert owners.split() == ["user:user", "user:user"]
        with pytest.raises(SandboxException, match="ermission denied"):
            sb.files.write("/etc/not-yours", "x")
        assert sb.files.write("/etc/root-s", "x", user="root").path == "/etc/root-s"
        assert sb.files.make_dir("notes/sub") is True
        assert sorted(e.name for e in sb.files.list("notes", depth=2)) == ["a.txt", "sub"]
        handle = sb.files.watch_dir("notes")
        try:
            sb.files.rename("notes/a.txt", "notes/b.txt")
            seen: set[tuple[str, object]] = set()
            deadline = time.monotonic() + 20
            while ("b.txt", FilesystemEventType.CREATE) not in seen:
                assert time.monotonic() < deadline, seen
                seen |= {(e.name, e.type) for e in handle.get_new_events()}
                time.sleep(0.1)
            assert ("a.txt", FilesystemEventType.RENAME) in seen
        finally:
            handle.stop()
        sb.files.remove("notes")
        assert sb.files.exists("notes") is False
    finally:
        assert sb.kill() is True


def test_files_on_gvisor(e2b_docker_daemon: E2bDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under runsc a thread may lack setfsuid: the agent then writes itself and gives
    the file to the user, so ownership holds either way."""
    for name, value in e2b_docker_daemon.env().items():
        monkeypatch.setenv(name, value)
    with e2b_docker_daemon.api() as api:
        r = api.post("/sandboxes", json={"runtime": "runsc"})
        assert r.status_code == 201, r.text
        sandbox_id = r.json()["id"]
        try:
            sb = Sandbox.connect(sandbox_id)  # a kiln sandbox: its user is kiln's `sandbox`
            info = sb.files.write("g/file.txt", "under gVisor")
            assert info.path == "/home/sandbox/g/file.txt"
            assert sb.files.read(info.path) == "under gVisor"
            # Not stat(1): this gVisor release answers its statx with EINVAL.
            script = (
                "python3 -c 'import os, pwd, sys; print(*(pwd.getpwuid(os.stat(p).st_uid)"
                ".pw_name for p in sys.argv[1:]))' /home/sandbox/g /home/sandbox/g/file.txt"
            )
            owners = kiln_exec(api, sandbox_id, script)
            assert owners.split() == ["sandbox", "sandbox"]
            assert sb.files.make_dir("g/d") is True
            assert sorted(e.name for e in sb.files.list("g")) == ["d", "file.txt"]
            sb.files.rename("g/file.txt", "g/d/moved.txt")
            assert sb.files.get_info("g/d/moved.txt").owner == "sandbox"
            sb.files.remove("g")
            assert sb.files.exists("g") is False
        finally:
            assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204
