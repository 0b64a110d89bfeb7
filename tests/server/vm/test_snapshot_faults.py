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
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kiln.engine.qemu.process import find_processes
from kiln.images.cache import default_image_dir

from .conftest import vm_marks
from .serve import Serve

pytestmark = [*vm_marks, pytest.mark.timeout(300)]

KEPT = "/workspace/kept"


def _config(root: Path, data: Path, netns: str) -> Path:
    config = root / "kiln.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data),
                "listen": "127.0.0.1:0",
                "image_dir": str(default_image_dir()),
                "templates": False,  # a boot needs less disk than a template
                "thermal": {"hot_to_warm_s": 3600, "warm_to_cold_s": 7200},
                "network": {
                    "netns": netns,
                    "bridge": "ksnf0",
                    "subnet": "10.213.47.0/24",
                    "nat": False,
                },
            }
        )
    )
    return config


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kiln-snf-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _client(serve: Serve, data: Path) -> httpx.Client:
    key = (data / "admin-api-key").read_text().strip()
    return httpx.Client(base_url=serve.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _exec(c: httpx.Client, name: str, *cmd: str) -> str:
    r = c.post(f"/sandboxes/{name}/exec", json={"cmd": list(cmd)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exit_code"] == 0, body
    return str(body["stdout"])


def _meta(data: Path, sid: str) -> dict[str, Any]:
    return dict(json.loads((data / "qemu" / "sandboxes" / sid / "snapshot.json").read_text()))


def _kill_vms(data: Path) -> None:
    for pid in find_processes(f"{data}/"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_qemu_killed_during_the_snapshot_write(tmp_path: Path, netns: str) -> None:
    data = tmp_path / "data"
    (tmp_path / "home").mkdir()
    config = _config(tmp_path, data, netns)
    serve = Serve(
        config,
        tmp_path / "home",
        tmp_path / "serve.log",
        env={"KILN_CRASH_AT": "qemu.snapshot.writing:qemu"},
    )
    try:
        with _client(serve, data) as c:
            sb = c.post("/sandboxes", json={"name": "k", "memory_mb": 256})
            assert sb.status_code == 201, sb.text
            sid = sb.json()["id"]
            _exec(c, "k", "sh", "-c", f"echo kept > {KEPT} && sync")
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
            assert _exec(c, "k", "cat", KEPT) == "kept\n"
            listed = c.get("/sandboxes/k").json()
            assert (listed["status"], listed["thermal"]) == ("running", "hot"), listed
            assert listed["last_boot"]["reason"] == "rebooted", listed
            # It can be deleted, leaving nothing.
            assert c.delete("/sandboxes/k").status_code == 204
            assert list((data / "qemu" / "sandboxes").iterdir()) == []
        assert serve.stop() == 0
    finally:
        serve.stop(signal.SIGKILL)
        _kill_vms(data)


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
        _kill_vms(mnt)
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


def test_disk_full_during_the_snapshot(tmp_path: Path, netns: str, small_disk: Path) -> None:
    data = small_disk / "data"
    (tmp_path / "home").mkdir()
    config = _config(tmp_path, data, netns)
    serve = Serve(config, tmp_path / "home", tmp_path / "serve.log")
    try:
        with _client(serve, data) as c:
            sb = c.post("/sandboxes", json={"name": "f", "memory_mb": 256})
            assert sb.status_code == 201, sb.text
            sid = sb.json()["id"]
            _exec(c, "f", "sh", "-c", f"echo before > {KEPT} && sync")
            # A first stop and start: a snapshot taken, then spent by the restore.
            assert c.post("/sandboxes/f/stop").json()["status"] == "stopped"
            assert c.post("/sandboxes/f/start").json()["status"] == "running"
            _exec(c, "f", "sh", "-c", f"echo told > {KEPT} && sync")
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
                assert _exec(c, "f", "cat", KEPT) == "told\n"  # still usable
            else:
                assert listed["status"] == "stopped", listed

            filler.unlink()
            r = c.post("/sandboxes/f/stop")
            assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
            assert c.post("/sandboxes/f/start").json()["status"] == "running"
            assert _exec(c, "f", "cat", KEPT) == "told\n"
            assert c.delete("/sandboxes/f").status_code == 204
        assert serve.stop() == 0
    finally:
        serve.stop(signal.SIGKILL)
