"""Disk images of a sandbox: the root filesystem, the config drive and volumes.

- Root filesystem: a per-sandbox copy of the image's ``rootfs.ext4``, either a
  qcow2 overlay on the (read-only, never rewritten) image or a full sparse copy
  (``cp --reflink=auto --sparse=always``; a reflink where the filesystem can).
- Config drive (``/dev/vdb``): a small ext4 made by ``mkfs.ext4 -d`` from a
  directory holding ``config.json`` -- no mount, no root-only loop devices.
- Volumes: ext4 images that outlive sandboxes; new ones made by ``mkfs.ext4``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from ..errors import EngineError
from .process import launch_nice

DISK_MODES: Final = ("qcow2", "copy")
_MIB: Final = 1 << 20
#: The volume's root directory belongs to the guest's default user (uid 1000).
VOLUME_OWNER: Final = "1000:1000"
_TOOL_TIMEOUT: Final = 120.0


async def run_tool(argv: Sequence[str | os.PathLike[str]], timeout: float = _TOOL_TIMEOUT) -> str:  # noqa: ASYNC109
    """Run a host command; EngineError with its stderr tail when it fails."""
    args = [os.fspath(a) for a in argv]
    nice = launch_nice.get()
    try:
        proc = await asyncio.create_subprocess_exec(
            *(["nice", "-n", str(nice)] if nice else []),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise EngineError(f"cannot run {args[0]}: {exc.strerror}") from exc
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise EngineError(f"{args[0]} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = " / ".join(err.decode(errors="replace").strip().splitlines()[-4:])
        raise EngineError(f"{' '.join(args[:3])} ... exited with {proc.returncode}: {tail}")
    return out.decode(errors="replace")


async def make_rootfs(image_rootfs: Path, dest: Path, mode: str) -> str:
    """Create the sandbox's root disk at ``dest``; returns its QEMU format."""
    if mode == "qcow2":
        await run_tool(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image_rootfs, dest]
        )
        return "qcow2"
    if mode == "copy":
        await copy_sparse(image_rootfs, dest)
        return "raw"
    raise EngineError(f"disk mode must be one of {DISK_MODES}, got {mode!r}")


async def copy_sparse(src: Path, dest: Path) -> None:
    """A copy that keeps holes (a reflink where the filesystem can)."""
    await run_tool(["cp", "--reflink=auto", "--sparse=always", src, dest])


async def copy_into(src: Path, dest: Path) -> None:
    """``src``'s data into ``dest``, which is missing or all holes, in place: ``dest``
    keeps its inode (a QEMU may have it open or mapped already) and ``src``'s holes
    stay holes. ``dest`` ends up ``src``'s size."""
    await asyncio.to_thread(_copy_into, src, dest)


def _copy_into(src: Path, dest: Path) -> None:
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd_in).st_size
            if os.fstat(fd_out).st_size != size:
                os.ftruncate(fd_out, size)
            for start, end in _extents(fd_in, size):
                at = start
                while at < end:
                    # In the kernel, no copy through user space (a reflink where the
                    # filesystem can).
                    n = os.copy_file_range(fd_in, fd_out, end - at, at, at)
                    if n == 0:
                        raise EngineError(f"{src} shrank while it was copied")
                    at += n
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) byte ranges of ``fd`` that hold data (SEEK_DATA/SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def config_drive_size(config_json_bytes: int) -> int:
    """Bytes for an ext4 that comfortably holds a config.json this big (≥ 4 MiB, MiB-aligned)."""
    need = 2 * config_json_bytes + 2 * _MIB
    return max(4 * _MIB, -(-need // _MIB) * _MIB)


async def make_config_drive(dest: Path, config: dict[str, Any], size: int | None = None) -> None:
    """An ext4 image at ``dest`` whose root holds ``config.json`` (mode 0600), of
    ``size`` bytes if given (EngineError if that is too small)."""
    payload = json.dumps(config, separators=(",", ":")).encode()
    need = config_drive_size(len(payload))
    if size is not None and need > size:
        raise EngineError(f"the config drive needs {need} bytes, more than {size}")
    with tempfile.TemporaryDirectory(prefix="kiln-cfg-", dir=dest.parent) as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir(mode=0o700)
        target = tree / "config.json"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        make_sparse(dest, size if size is not None else need)
        await run_tool(["mkfs.ext4", "-q", "-F", "-L", "kiln-config", "-m", "0", "-d", tree, dest])


async def make_volume(dest: Path, size_mb: int, label: str) -> None:
    """A new, empty ext4 volume image (fails if ``dest`` exists)."""
    make_sparse(dest, size_mb * _MIB, exclusive=True)
    try:
        await run_tool(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-L",
                label[:16],
                "-E",
                f"root_owner={VOLUME_OWNER}",
                dest,
            ]
        )
    except BaseException:
        _unlink_quietly(dest)
        raise


_QCOW2_MAGIC: Final = b"QFI\xfb"


def unreadable(path: Path) -> str | None:
    """Blocking: what keeps QEMU from using the disk (or kernel) at ``path`` -- missing,
    unreadable, empty, or a qcow2 overlay whose backing file is -- or None."""
    backing: Path | None = None
    try:
        with open(path, "rb") as f:
            header = f.read(512)
            if header[:4] == _QCOW2_MAGIC and len(header) >= 20:
                offset = int.from_bytes(header[8:16], "big")
                size = int.from_bytes(header[16:20], "big")
                if offset and size:
                    f.seek(offset)
                    backing = Path(f.read(size).decode(errors="replace"))
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not header:
        return "is empty"
    if backing is not None:
        problem = unreadable(path.parent / backing)  # an absolute one stays absolute
        if problem is not None:
            return f"has a backing file {backing} that {problem}"
    return None


def make_sparse(path: Path, size: int, *, exclusive: bool = False) -> None:
    """``path``: an empty (all holes) file of ``size`` bytes, mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
