"""A config drive written after its sandbox is already running.

A pool claim hands the guest its configuration over the agent (CONFIGURE); the
config drive, which only a boot from the sandbox's own disks reads, is left for
later: its ``mkfs`` would otherwise compete for the host's CPUs with the new
sandbox's first requests (measured: it doubled the claim's CONFIGURE round trip
and slowed the first exec after it on a busy 2-core host).

The claim leaves a marker next to the drive (:func:`mark_due`, written with
``sandbox.json``); the pool's background task writes the drive once the claim
has settled (:func:`write_later`), and whatever boots the sandbox from its disks
first brings the drive up to date itself (:func:`bring_up_to_date`). The marker
is on disk, so a daemon that stops or crashes in between loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from .layout import Paths, Record
from .machine import VM
from .snapshot import fsync_dir

#: Writes the config drive of a record to a new file (the provisioner's).
DriveWriter = Callable[[Record, Path], Awaitable[None]]


def mark_due(paths: Paths) -> None:
    """Blocking: note that the drive is not the sandbox's yet."""
    fd = os.open(paths.drive_due, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


def is_due(paths: Paths) -> bool:
    return paths.drive_due.exists()


async def bring_up_to_date(vm: VM, write: DriveWriter) -> None:
    """The sandbox's own config drive before a boot from its disks (the caller holds
    ``vm.lock``); nothing to do unless one is due."""
    if await asyncio.to_thread(is_due, vm.paths):
        await _write_and_install(vm, write)


async def write_later(vm: VM, write: DriveWriter) -> None:
    """Write the due drive into a new file (the slow part, without the lock), then put
    it in place under ``vm.lock`` -- unless a boot did so first, or it is destroyed."""
    if vm.destroyed:
        return
    new = _new_file(vm.paths)
    try:
        await write(vm.record, new)
        async with vm.lock:
            if not vm.destroyed and await asyncio.to_thread(is_due, vm.paths):
                await asyncio.to_thread(_install, new, vm.paths)
    finally:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(new.unlink)


async def _write_and_install(vm: VM, write: DriveWriter) -> None:
    new = _new_file(vm.paths)
    try:
        await write(vm.record, new)
        await asyncio.to_thread(_install, new, vm.paths)
    finally:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(new.unlink)


def _new_file(paths: Paths) -> Path:
    return paths.root / f".config.img.{secrets.token_hex(4)}"


def _install(new: Path, paths: Paths) -> None:
    """The new drive in place, then the marker gone (a crash between keeps the marker:
    the drive is written once more)."""
    os.replace(new, paths.config_drive)
    fsync_dir(paths.root)
    paths.drive_due.unlink(missing_ok=True)
    fsync_dir(paths.root)
