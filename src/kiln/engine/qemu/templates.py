"""Template snapshots: boot once per machine shape, create each sandbox by a restore.

Booting a guest costs ~4 s under TCG, half of it Python starting and importing
the agent as PID 1. None of that depends on the sandbox, so the engine boots
each machine shape once, with a *placeholder* config drive
(:data:`~kiln.guest.config.TEMPLATE_MAGIC`): the agent does everything
sandbox-independent, logs :data:`~kiln.guest.config.TEMPLATE_READY_LINE` on the
console and polls the drive. The engine stops it there -- an ordinary cold
snapshot -- into ``<data_dir>/templates/<key>/``.

A create then copies the template's root disk into the new sandbox directory
(a sparse copy), writes the sandbox's real config drive *of the placeholder's
size* (the guest kernel already knows the disk's size) and restores with the
template's RAM file mapped copy-on-write (``share=off``): the pages a clone never
writes stay one page cache shared by every clone of the template (measured: 10
idle clones of 512 MB, guest RAM PSS 59 → ~17 MiB each), and the file is never
written. A clone's first stop therefore puts its whole RAM into the snapshot
(:mod:`.snapshot`'s *full* fallback); from its restore on it has a RAM file of
its own. The agent sees the new drive, sets the clock and reseeds
the RNG from it (every clone starts from one RNG state), configures hostname,
network (including the sandbox's own MAC: the NIC's MAC is device state, so a
clone starts with the template's), user, files and init, and answers.

A restore needs exactly the devices of the snapshot, and microvm has no disk
hotplug: a template boots with :data:`VOLUME_SLOTS` placeholder disks, and a
sandbox's volumes take those slots (the engine then resizes each to its
current size, which sends the guest the capacity change it waits for). A spec
with more volumes, or a config too big for the placeholder drive, boots.

The key covers everything that shapes the machine or its snapshot: image,
vCPUs, memory, accelerator, disk mode, the QEMU binary, the argv settings and
the slot count; a template whose key no longer matches is simply not found,
and a build replaces a broken one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kiln.guest.config import TEMPLATE_MAGIC, TEMPLATE_READY_LINE

from ..base import SandboxSpec
from ..errors import EngineError
from .disks import config_drive_size
from .layout import Paths
from .snapshot import write_json_atomic

TEMPLATE_VERSION: Final = 1
#: Size of every template-made config drive (and of the placeholder): fits a
#: config.json of about 3 MiB (files, init, env); larger ones boot normally.
DRIVE_SIZE: Final = 8 << 20
TEMPLATE_FILE: Final = "template.json"
#: Disk slots (vdc…) a template boots with, for the volumes of the sandboxes made
#: from it (microvm has no disk hotplug); a spec with more volumes boots.
VOLUME_SLOTS: Final = 4
#: What a slot holds until a volume takes it: a small sparse file.
SLOT_PLACEHOLDER_SIZE: Final = 1 << 20
_READY_POLL: Final = 0.02


def template_key(shape: Mapping[str, Any]) -> str:
    """A stable hex digest of everything that makes a template reusable."""
    data = json.dumps({"version": TEMPLATE_VERSION, **shape}, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def qemu_identity(binary_path: str) -> str:
    """Which QEMU build this is (a package upgrade changes it, and with it the
    snapshot format): the resolved path, size and mtime of the binary."""
    try:
        st = os.stat(binary_path)
    except OSError:
        return binary_path
    return f"{os.path.realpath(binary_path)}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True, slots=True)
class Template:
    """A finished template directory."""

    key: str
    paths: Paths
    rootfs_format: str

    @property
    def rootfs(self) -> Path:
        return self.paths.rootfs(self.rootfs_format)


def config_fits(spec: SandboxSpec) -> bool:
    """Whether the spec's config.json surely fits a :data:`DRIVE_SIZE` drive (base64
    files, JSON escaping at most doubling text, 64 KiB for the rest)."""
    files = sum(len(f.content) for f in spec.files) * 4 // 3 + 8 * len(spec.files)
    text = sum(len(k) + len(v) for k, v in spec.env.items()) + len(spec.init or "")
    payload = files + 2 * text + (64 << 10)
    return config_drive_size(payload) <= DRIVE_SIZE


def template_dir(templates_dir: Path, key: str) -> Path:
    return templates_dir / key[:24]


def load(templates_dir: Path, key: str) -> Template | None:
    """The finished template for ``key``, or None (absent, unfinished or stale)."""
    paths = Paths(template_dir(templates_dir, key))
    try:
        data = json.loads((paths.root / TEMPLATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    fmt = str(data.get("rootfs_format", "qcow2"))
    tpl = Template(key, paths, fmt)
    if not all(p.exists() for p in (tpl.rootfs, paths.ram, paths.state)):
        return None
    return tpl


def finish(
    paths: Paths, key: str, rootfs_format: str, build_ms: float, shape: Mapping[str, Any]
) -> Template:
    """Mark a built template directory usable (its last step). ``shape`` is what
    :func:`superseded` compares: tier, cpus and memory_mb."""
    write_json_atomic(
        paths.root / TEMPLATE_FILE,
        {
            "version": TEMPLATE_VERSION,
            "key": key,
            "rootfs_format": rootfs_format,
            "created_at": time.time(),
            "build_ms": round(build_ms, 1),
            "shape": dict(shape),
        },
    )
    return Template(key, paths, rootfs_format)


def superseded(templates_dir: Path, current: Template) -> list[Path]:
    """Finished templates of ``current``'s shape under another key (an older image
    or QEMU): nothing will restore them again."""
    try:
        mine = json.loads((current.paths.root / TEMPLATE_FILE).read_text())["shape"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    found = []
    for entry in sorted(templates_dir.iterdir()):
        if entry == current.paths.root or not entry.is_dir():
            continue
        try:
            data = json.loads((entry / TEMPLATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("shape") == mine:
            found.append(entry)
    return found


def unfinished(templates_dir: Path) -> list[Path]:
    """Template directories a build left behind without finishing them."""
    if not templates_dir.is_dir():
        return []
    return [d for d in sorted(templates_dir.iterdir()) if not (d / TEMPLATE_FILE).exists()]


def write_placeholder_drive(path: Path) -> None:
    """The drive a template boots with: :data:`DRIVE_SIZE` bytes, sparse, the magic first."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, DRIVE_SIZE)
        os.pwrite(fd, TEMPLATE_MAGIC, 0)
    finally:
        os.close(fd)


def write_slot_placeholder(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, SLOT_PLACEHOLDER_SIZE)
    finally:
        os.close(fd)


def console_ready(console_log: Path, offset: int = 0) -> bool:
    """Whether the guest has logged that it waits for its config drive."""
    try:
        with open(console_log, "rb") as f:
            f.seek(offset)
            return TEMPLATE_READY_LINE.encode() in f.read()
    except FileNotFoundError:
        return False


async def wait_ready(
    console_log: Path,
    alive: Callable[[], bool],
    timeout: float,  # noqa: ASYNC109 -- a deadline with a death check on every poll
    describe: Callable[[], str],
) -> None:
    """Until the template guest waits for its drive; EngineError if QEMU dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not console_ready(console_log):
        if not alive():
            raise EngineError(f"the template VM died while booting: {describe()}")
        if time.monotonic() > deadline:
            raise EngineError(f"the template VM was not ready within {timeout:.0f} s: {describe()}")
        await asyncio.sleep(_READY_POLL)
