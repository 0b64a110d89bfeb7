"""Cache primitives: location, atomic publication, stale leftovers, the build lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.images import ImageError, list_images, prune_images
from kiln.images.cache import (
    build_lock,
    clean_stale,
    default_image_dir,
    make_read_only,
    publish,
    temp_dir,
    write_manifest,
)


def test_default_image_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KILN_IMAGE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_image_dir() == tmp_path / ".cache/kiln/images"
    monkeypatch.setenv("KILN_IMAGE_DIR", str(tmp_path / "elsewhere"))
    assert default_image_dir() == tmp_path / "elsewhere"


def _entry(image_dir: Path, name: str, content: str) -> Path:
    tmp = temp_dir(image_dir, "images", name)
    (tmp / "file").write_text(content)
    make_read_only(tmp)
    return tmp


def test_publish_is_a_rename_and_replaces_an_old_entry(tmp_path: Path) -> None:
    final = tmp_path / "images" / "x"
    first = _entry(tmp_path, "x", "one")
    assert first.name.startswith(".tmp-x-")
    publish(first, final)
    assert not first.exists() and (final / "file").read_text() == "one"
    second = _entry(tmp_path, "x", "two")
    publish(second, final)
    assert (final / "file").read_text() == "two"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["x"]


def test_clean_stale_removes_only_leftovers(tmp_path: Path) -> None:
    leftover = _entry(tmp_path, "minimal-0123", "half")  # a killed build, read-only files
    old = tmp_path / "kernel" / ".old-abc-1234"
    old.mkdir(parents=True)
    keep = tmp_path / "base" / "0123abcd"
    keep.mkdir(parents=True)
    assert sorted(clean_stale(tmp_path)) == sorted([leftover, old])
    assert not leftover.exists() and not old.exists() and keep.exists()


def _fake_image(path: Path, digest: str, built_at: str = "2025-01-01T00:00:00+00:00") -> None:
    path.mkdir(parents=True)
    for name in ("vmlinux", "initramfs.cpio", "rootfs.ext4"):
        (path / name).write_bytes(b"")
    write_manifest(
        path / "image.json",
        {
            "tier": "minimal",
            "digest": digest,
            "kernel_version": "6.1.0-test",
            "size_bytes": 1 << 30,
            "built_at": built_at,
            "files": {"kernel": "vmlinux", "initrd": "initramfs.cpio", "rootfs": "rootfs.ext4"},
        },
    )


def test_list_images_ignores_incomplete_and_temporary_entries(tmp_path: Path) -> None:
    _fake_image(tmp_path / "images" / "minimal-aaaa", "aaaa" * 16)
    _fake_image(tmp_path / "images" / ".tmp-minimal-bbbb-1-ff", "bbbb" * 16)  # not published
    (tmp_path / "images" / "minimal-cccc").mkdir()  # no manifest: never complete
    (tmp_path / "images" / "minimal-dddd").mkdir()
    (tmp_path / "images" / "minimal-dddd" / "image.json").write_text('{"tier": "minimal"')
    images = list_images(tmp_path)
    assert [i.digest for i in images] == ["aaaa" * 16]
    assert images[0].rootfs == tmp_path / "images" / "minimal-aaaa" / "rootfs.ext4"
    assert json.loads((tmp_path / "images/minimal-aaaa/image.json").read_text())["tier"]


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_build_lock_waits_for_another_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".lock"), "1.0"],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        messages: list[str] = []
        with (
            pytest.raises(ImageError, match="another build held"),
            build_lock(tmp_path, messages.append, timeout=0.3),
        ):
            pass
        assert messages == ["waiting for another kiln image build to finish…"]
        start = time.monotonic()
        with build_lock(tmp_path, messages.append, timeout=30):
            waited = time.monotonic() - start
        assert 0.2 < waited < 5
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with build_lock(tmp_path, messages.append, timeout=0):  # free again: no waiting
        pass


def test_prune_keeps_the_newest_images(tmp_path: Path) -> None:
    for day in range(1, 6):
        _fake_image(
            tmp_path / "images" / f"minimal-{day:04d}", f"{day:04d}" * 16, f"2025-01-0{day}"
        )
    assert prune_images("minimal", tmp_path, keep=2) == [
        tmp_path / "images" / f"minimal-{day:04d}" for day in (1, 2, 3)
    ]
    assert [i.path.name for i in list_images(tmp_path)] == ["minimal-0004", "minimal-0005"]
    assert prune_images("minimal", tmp_path, keep=2) == []
