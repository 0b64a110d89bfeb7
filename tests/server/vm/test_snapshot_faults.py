"""A stop whose snapshot write fails: QEMU killed in the middle of it, or the disk
holding the data directory full. Real ``kiln serve``, real QEMU microVMs.

In both cases no snapshot metadata vouches for a half-written snapshot (the
RAM file is live while the VM runs, so the last valid snapshot is the one a
stop completed and no restore has spent), the user gets an error that says
what happened, and the sandbox is either usable with its files or reported as
broken -- never listed as running without a VM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.qemu.process import find_processes

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host, kill_vms
from .serve import client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(300)]

KEPT = "/workspace/kept"


def _host(root: Path, data: Path | None = None) -> contextlib.AbstractContextManager[Host]:
    return daemon_host(
        root,
        "kiln-snf",
        vm=Bridge("ksnf0", "10.213.47.0/24"),
        data=data,
        extra={
            "templates": False,  # a boot needs less disk than a template
            "thermal": {"hot_to_warm_s": 3600, "warm_to_cold_s": 7200},
        },
    )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with _host(tmp_path) as h:
        yield h


def _meta(data: Path, sid: str) -> dict[str, Any]:
    return dict(json.loads((data / "qemu" / "sandboxes" / sid / "snapshot.json").read_text()))


def test_qemu_killed_during_the_snapshot_write(host: Host) -> None:
    data = host.data
    serve = host.serve(env={"KILN_CRASH_AT": "qemu.snapshot.writing:qemu"})
    try:
        with client(serve, data) as c:
            sb = c.post("/sandboxes", json={"name": "k", "memory_mb": 256})
            assert sb.status_code == 201, sb.text
            sid = sb.json()["id"]
            exec_ok(c, "k", "sh", "-c", f"echo kept > {KEPT} && sync")
            r = c.post("/sandboxes/k/stop")
            assert "crash point qemu.snapshot.writing reached: SIGKILL qemu" in serve.output()
            assert r.status_code >= 400, r.text
            error = r.json()["error"]
            assert "QEMU" in error and ("died" in error or "exited" in error), error
            # No snapshot vouched for, no half-written state left beside the old one.
            assert _meta(data, sid)["valid"] is False
            assert not (data / "qemu" / "sandboxes" / sid / "state.bin.tmp").exists()
            assert find_processes(f"{data}/qemu/sandboxes/{sid}/") == []
            # Its memory is lost, its disk is not: it is running and cold, and its
            # next use boots it again from its disk (files kept, processes lost).
            listed = c.get("/sandboxes/k").json()
            assert (listed["status"], listed["thermal"]) == ("running", "cold"), listed
            assert "boots again" in error, error
            assert exec_ok(c, "k", "cat", KEPT) == "kept\n"
            listed = c.get("/sandboxes/k").json()
            assert (listed["status"], listed["thermal"]) == ("running", "hot"), listed
            assert listed["last_boot"]["reason"] == "rebooted", listed
            # It can be deleted, leaving nothing.
            assert c.delete("/sandboxes/k").status_code == 204
            assert list((data / "qemu" / "sandboxes").iterdir()) == []
        assert serve.stop() == 0
    finally:
        serve.stop(signal.SIGKILL)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2.5 GB ext4 file system (no blocks reserved for root), loop-mounted: room for
    the pinned image (its rootfs copied in full) and one sandbox."""
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(2500 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        kill_vms(mnt)  # a VM holding a file open there would keep the file system busy
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full; the file (remove it to free the space)."""
    filler = directory / "filler"
    chunk = b"\xa5" * (1 << 20)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        st = os.statvfs(directory)
        ahead = st.f_bavail * st.f_frsize - (8 << 20)
        if ahead > 0:  # most of it without writing it
            os.posix_fallocate(fd, 0, ahead)
            os.lseek(fd, ahead, os.SEEK_SET)
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    break
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def host_on_small_disk(tmp_path: Path, small_disk: Path) -> Iterator[Host]:
    """A host whose data directory is on ``small_disk``."""
    with _host(tmp_path, data=small_disk / "data") as h:
        yield h


def test_disk_full_during_the_snapshot(host_on_small_disk: Host, small_disk: Path) -> None:
    data = host_on_small_disk.data
    serve = host_on_small_disk.serve()
    try:
        with client(serve, data) as c:
            sb = c.post("/sandboxes", json={"name": "f", "memory_mb": 256})
            assert sb.status_code == 201, sb.text
            sid = sb.json()["id"]
            exec_ok(c, "f", "sh", "-c", f"echo before > {KEPT} && sync")
            # A first stop and start: a snapshot taken, then spent by the restore.
            assert c.post("/sandboxes/f/stop").json()["status"] == "stopped"
            assert c.post("/sandboxes/f/start").json()["status"] == "running"
            exec_ok(c, "f", "sh", "-c", f"echo told > {KEPT} && sync")
            state = (data / "qemu" / "sandboxes" / sid / "state.bin").read_bytes()

            filler = _fill(small_disk)
            r = c.post("/sandboxes/f/stop")
            assert r.status_code >= 400, r.text
            error = r.json()["error"]
            assert "disk" in error and "full" in error, error
            # The previous state file is untouched, and nothing claims a snapshot.
            assert (data / "qemu" / "sandboxes" / sid / "state.bin").read_bytes() == state
            assert not (data / "qemu" / "sandboxes" / sid / "state.bin.tmp").exists()
            listed = c.get("/sandboxes/f").json()
            if listed["status"] == "running":
                assert _meta(data, sid)["valid"] is False
                assert exec_ok(c, "f", "cat", KEPT) == "told\n"  # still usable
            else:
                assert listed["status"] == "stopped", listed

            filler.unlink()
            r = c.post("/sandboxes/f/stop")
            assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
            assert c.post("/sandboxes/f/start").json()["status"] == "running"
            assert exec_ok(c, "f", "cat", KEPT) == "told\n"
            assert c.delete("/sandboxes/f").status_code == 204
        assert serve.stop() == 0
    finally:
        serve.stop(signal.SIGKILL)
