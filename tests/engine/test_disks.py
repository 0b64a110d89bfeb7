"""Disk images: config drive, volumes and root disks, made with the real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kiln.engine.errors import EngineError
from kiln.engine.qemu.disks import (
    config_drive_size,
    copy_into,
    make_config_drive,
    make_rootfs,
    make_sparse,
    make_volume,
    run_tool,
)

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("mkfs.ext4", "debugfs", "qemu-img")),
    reason="e2fsprogs or qemu-utils missing",
)


def debugfs(image: Path, request: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return out.stdout


async def test_config_drive_holds_config_json_readable_by_root_only(tmp_path: Path) -> None:
    config = {"sandbox_id": "sb", "token": "t" * 32, "files": [{"path": "/x", "content": "aGk="}]}
    image = tmp_path / "config.img"
    await make_config_drive(image, config)
    assert json.loads(debugfs(image, "cat /config.json")) == config
    assert "Mode:  0600" in debugfs(image, "stat /config.json")
    assert image.stat().st_size == 4 << 20


def test_config_drive_grows_with_its_content() -> None:
    assert config_drive_size(len(b"{}")) == 4 << 20
    assert config_drive_size(10 << 20) == 22 << 20


async def test_new_volume_is_an_empty_ext4_owned_by_the_sandbox_user(tmp_path: Path) -> None:
    image = tmp_path / "data.ext4"
    await make_volume(image, 16, "data")
    assert image.stat().st_size == 16 << 20
    root = debugfs(image, "stat /")
    assert "User:  1000" in root and "Group:  1000" in root
    with pytest.raises(FileExistsError):
        await make_volume(image, 16, "data")  # never overwrites an existing volume


async def test_root_disk_as_qcow2_overlay_or_copy(tmp_path: Path) -> None:
    base = tmp_path / "base.ext4"
    base.write_bytes(b"\0" * 4096 + b"rootfs")
    overlay = tmp_path / "rootfs.qcow2"
    assert await make_rootfs(base, overlay, "qcow2") == "qcow2"
    info = json.loads(await run_tool(["qemu-img", "info", "--output=json", overlay]))
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    copy = tmp_path / "rootfs.img"
    assert await make_rootfs(base, copy, "copy") == "raw"
    assert copy.read_bytes() == base.read_bytes()
    with pytest.raises(EngineError, match="disk mode"):
        await make_rootfs(base, tmp_path / "x", "zfs")


async def test_a_failing_tool_is_an_engine_error_with_its_message(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="exited with"):
        await run_tool(["qemu-img", "info", tmp_path / "missing.img"])
    with pytest.raises(EngineError, match="cannot run"):
        await run_tool([tmp_path / "no-such-tool"])


def _sparse_source(path: Path, size: int) -> None:
    """Two data extents in a sparse file."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(b"a" * 4096)
        f.seek(40 << 20)
        f.write(b"b" * (3 << 20))


async def test_copy_into_fills_a_file_in_place_and_keeps_the_holes(tmp_path: Path) -> None:
    src, dest = tmp_path / "ram", tmp_path / "copy"
    size = 64 << 20
    _sparse_source(src, size)
    make_sparse(dest, size)
    fd = os.open(dest, os.O_RDONLY)  # as a QEMU that opened it already
    try:
        await copy_into(src, dest)
        assert os.pread(fd, size, 0) == src.read_bytes()
    finally:
        os.close(fd)
    assert dest.stat().st_size == size
    assert dest.stat().st_blocks * 512 <= 5 << 20  # the holes stayed holes
    # Missing: made, at the source's size.
    await copy_into(src, tmp_path / "new")
    assert (tmp_path / "new").read_bytes() == src.read_bytes()
