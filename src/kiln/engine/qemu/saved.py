"""Saved images: a sandbox captured (disk, memory, device state) into a directory of
the engine's own, from which any number of sandboxes start, each with its own
identity, processes running and caches warm::

    <data_dir>/saved/<image_id>/
        saved.json       what it is: the saved sandbox's record (drives, kernel,
                         accelerator, shape), its config drive's size, when
        rootfs.qcow2     root disk (an overlay on the pinned base, as a sandbox's;
                         or rootfs.img)
        ram, state.bin   memory and device state (the RAM streamed into state.bin
                         when the sandbox had no RAM file of its own)
        snapshot.json    how to restore them

A save is :mod:`.capture` into ``.<image_id>.tmp``, renamed when complete, so a
crash leaves no half image under the name. A create from one copies its files into
the new sandbox's directory (sparse or reflink copies, as a template create does)
and hands over to :mod:`.clone`. Nothing here depends on templates: a saved image
holds all of its memory, and outlives template rebuilds and daemon restarts until
:meth:`SavedImages.delete`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Final

from ..base import SANDBOX_ID_RE, SandboxSpec, SavedImage
from ..errors import EngineError, ImageNotFound, InvalidSpec, InvalidState
from . import disks, machine, snapshot
from .capture import Capturer, DiskReady
from .clone import Cloner, Origin
from .config import QemuConfig
from .fork import check_source, origin_of
from .layout import Paths, Record
from .machine import ENGINE_NAME, VM

SAVED_FILE: Final = "saved.json"
SAVED_VERSION: Final = 1


class SavedImages:
    """The engine's saved images under ``config.saved_dir``."""

    def __init__(self, config: QemuConfig, capturer: Capturer, cloner: Cloner) -> None:
        self.config = config
        self._capturer = capturer
        self._cloner = cloner
        self._saving: set[str] = set()

    def _dir(self, image_id: str) -> Path:
        if not SANDBOX_ID_RE.match(image_id):
            raise InvalidSpec(f"invalid saved image id {image_id!r}")
        return self.config.saved_dir / image_id

    async def save(self, source: VM, image_id: str) -> SavedImage:
        check_source(source, "saved")
        final = self._dir(image_id)
        if final.exists() or image_id in self._saving:
            raise InvalidState(f"saved image {image_id!r} already exists")
        origin = await origin_of(source)
        tmp = final.with_name(f".{image_id}.tmp")
        self._saving.add(image_id)
        try:
            with machine.os_errors(f"saving {source.sandbox_id} as {image_id}"):
                await asyncio.to_thread(disks.remove_tree, tmp)  # a crashed save's
                await asyncio.to_thread(tmp.mkdir, 0o700, True)
                try:
                    paths = Paths(tmp)
                    rootfs = tmp / Path(source.record.drives[0].path).name
                    meta = await self._capturer.capture(source, paths, rootfs, template_ram=False)
                    image = SavedImage(
                        image_id=image_id,
                        engine=ENGINE_NAME,
                        image=origin.record.spec.image,
                        cpus=origin.record.spec.cpus,
                        memory_mb=origin.record.spec.memory_mb,
                        runtime=None,
                        size_bytes=await asyncio.to_thread(_allocated, tmp),
                        memory=True,
                        created_at=time.time(),
                    )
                    await asyncio.to_thread(_finish, paths, meta, origin, image, final)
                except BaseException:
                    await asyncio.to_thread(disks.remove_tree, tmp)
                    raise
        finally:
            self._saving.discard(image_id)
        return image

    def load(self, image_id: str) -> tuple[Origin, SavedImage]:
        root = self._dir(image_id)
        try:
            data = json.loads((root / SAVED_FILE).read_text())
            record = Record.from_json(data["record"])
            origin = Origin(record, int(data["drive_size"]))
            image = SavedImage(**data["image"])
        except FileNotFoundError:
            raise ImageNotFound(f"no saved image {image_id!r} in the QEMU engine") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"saved image {image_id!r} is unreadable: {exc!r}") from exc
        return origin, image

    async def create(self, spec: SandboxSpec, accel: str) -> VM:
        """A sandbox from the saved image ``spec.snapshot`` on a host running ``accel``;
        the caller adds it to ``vms``."""
        assert spec.snapshot is not None
        origin, _ = await asyncio.to_thread(self.load, spec.snapshot)
        self._cloner.check(origin, spec, "a sandbox made from a saved image")
        if origin.record.accel != accel:
            raise InvalidState(
                f"saved image {spec.snapshot!r} was saved under {origin.record.accel}; this"
                f" host runs {accel}, and a memory image restores only where it was made"
            )
        source = Paths(self._dir(spec.snapshot))
        src_rootfs = source.root / Path(origin.record.drives[0].path).name

        async def fill(vm: VM, disk_ready: DiskReady) -> snapshot.SnapshotMeta:
            # (The clone's QEMU starts once everything is copied.)
            saved = await asyncio.to_thread(snapshot.load_meta, source.snapshot_meta)
            dest = vm.paths
            await asyncio.gather(
                disks.copy_sparse(src_rootfs, Path(vm.record.drives[0].path)),
                disks.copy_sparse(source.ram, dest.ram),
                disks.copy_sparse(source.state, dest.state),
            )
            return snapshot.SnapshotMeta(
                valid=True,
                ram_inode=snapshot.ram_inode(dest.ram),
                ram_in_state=saved.ram_in_state,
            )

        return await self._cloner.clone(origin, spec, fill, f"from saved image {spec.snapshot}")

    async def remove_unfinished(self) -> list[str]:
        """Remove what saves a crashed daemon left half made (``.<id>.tmp``); a line each."""
        root = self.config.saved_dir
        entries = await asyncio.to_thread(lambda: sorted(root.iterdir()) if root.is_dir() else [])
        removed = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp") and name[1:-4] not in self._saving:
                await asyncio.to_thread(disks.remove_tree, entry)
                removed.append(f"unfinished saved image {entry}")
        return removed

    async def delete(self, image_id: str) -> None:
        root = self._dir(image_id)
        with machine.os_errors(f"deleting saved image {image_id}"):
            await asyncio.to_thread(disks.remove_tree, root)


def _allocated(root: Path) -> int:
    """Blocking: bytes the files under ``root`` take on disk (holes not counted)."""
    return sum(p.stat().st_blocks * 512 for p in root.iterdir() if p.is_file())


def _finish(
    paths: Paths, meta: snapshot.SnapshotMeta, origin: Origin, image: SavedImage, final: Path
) -> None:
    """Blocking: the meta files, everything durable, then the image under its name."""
    snapshot.save_meta(paths.snapshot_meta, meta)
    data: dict[str, Any] = {
        "version": SAVED_VERSION,
        "record": origin.record.to_json(),
        "drive_size": origin.drive_size,
        "image": dataclasses.asdict(image),
    }
    snapshot.write_json_atomic(paths.root / SAVED_FILE, data)
    for entry in paths.root.iterdir():
        snapshot.fsync_path(entry)
    os.rename(paths.root, final)
    snapshot.fsync_dir(final.parent)
