"""Packing and extracting local trees (what ``kiln cp`` does on this machine)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from kiln.archive import UnsafeArchive
from kiln.archive.local import extract, pack, top_name, tree_size


def test_pack_then_extract_renamed_keeps_modes_and_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x.sh").write_bytes(b"#!/bin/sh\n")
    (src / "d" / "x.sh").chmod(0o750)
    (src / "big").write_bytes(os.urandom(600_000))
    (src / "l").symlink_to("d/x.sh")
    os.mkfifo(src / "fifo")
    data = b"".join(pack(str(src), "src"))
    assert len(data) % 512 == 0
    assert tree_size(str(src)) == 600_000 + 10
    dest = tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert top_name(tar.getnames()[0]) == "src"
    assert extract(io.BytesIO(data), str(dest), ("src", "renamed")) == 6
    out = dest / "renamed"
    assert (out / "d" / "x.sh").stat().st_mode & 0o7777 == 0o750
    assert os.readlink(out / "l") == "d/x.sh"
    assert (out / "big").read_bytes() == (src / "big").read_bytes()
    assert (out / "fifo").is_fifo()


def test_extract_refuses_to_write_through_a_symlink_already_there(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a").symlink_to(outside)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafeArchive, match="outside"):
        extract(io.BytesIO(buf.getvalue()), str(dest))
    assert list(outside.iterdir()) == []


def test_extract_refuses_what_is_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchive, match="not a tar"):
        extract(io.BytesIO(b"garbage" * 100), str(tmp_path))
