"""The on-disk image cache: its location, the build lock, atomic publication.

Layout of the image directory (``$KILN_IMAGE_DIR`` or ``~/.cache/kiln/images``)::

    .lock                         flock(2): held by whoever is building
    base/<key>/root/              mmdebstrap'd + customised tree    (slow step)
    base/<key>/base.json
    kernel/<key>/vmlinux          ELF kernel, config, modules/NN-name.ko
    kernel/<key>/kernel.json
    images/<tier>-<digest16>/     vmlinux, initramfs.cpio, rootfs.ext4 (read-only)
    images/<tier>-<digest16>/image.json

Every entry is built in a ``.tmp-*`` sibling and renamed into place once its
manifest (the ``*.json``, written last) is complete, so an entry with a
manifest is always whole and readers need no lock. Builders hold ``.lock``;
any ``.tmp-*`` or ``.old-*`` left behind by a killed build is therefore stale
and is removed by the next builder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ImageError

SECTIONS = ("base", "kernel", "images")
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def default_image_dir() -> Path:
    """``$KILN_IMAGE_DIR``, or ``~/.cache/kiln/images``."""
    env = os.environ.get("KILN_IMAGE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kiln" / "images"


@contextlib.contextmanager
def build_lock(
    image_dir: Path, progress: Callable[[str], None], timeout: float = 3600.0
) -> Iterator[None]:
    """Hold the image directory's exclusive build lock (waiting up to ``timeout`` s)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(image_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another kiln image build to finish…")
            deadline = time.monotonic() + timeout
            while True:
                time.sleep(0.2)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ImageError(
                            f"another build held {image_dir / LOCK_NAME} for {timeout:.0f} s"
                        ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def clean_stale(image_dir: Path) -> list[Path]:
    """Remove leftovers of killed builds. Call only while holding the build lock."""
    removed = []
    for section in SECTIONS:
        parent = image_dir / section
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                rmtree(entry)
                removed.append(entry)
    return removed


def rmtree(path: Path) -> None:
    """Remove a file or a directory tree, read-only entries included."""
    if path.is_dir() and not path.is_symlink():
        for p in (path, *path.rglob("*")):  # published entries are read-only
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def temp_dir(image_dir: Path, section: str, name: str) -> Path:
    """A fresh ``.tmp-*`` directory next to where ``name`` will be published."""
    parent = image_dir / section
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


@contextlib.contextmanager
def staging(image_dir: Path, section: str, name: str) -> Iterator[Path]:
    """:func:`temp_dir`, removed again if the block fails (a kill leaves it to clean_stale)."""
    path = temp_dir(image_dir, section, name)
    try:
        yield path
    except BaseException:
        rmtree(path)
        raise


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished ``tmp`` entry to ``final``, replacing an old one."""
    old: Path | None = None
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise ImageError(f"cannot publish {final}: {exc}") from exc
        old = final.with_name(f"{OLD_PREFIX}{final.name}-{secrets.token_hex(4)}")
        os.rename(final, old)
        os.rename(tmp, final)
    if old is not None:
        rmtree(old)


def write_manifest(path: Path, doc: dict[str, Any]) -> None:
    """Write a manifest (the last file of an entry) and fsync it."""
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest's content, or None when it is missing or unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def make_read_only(root: Path) -> None:
    """Drop write permission on the files of a finished entry (the engine copies them)."""
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(p.stat().st_mode & ~0o222)
