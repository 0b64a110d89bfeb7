"""Configuration of the QEMU engine (validated on construction, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from kiln.network import NetworkConfig

from ..errors import EngineUnavailable
from .accel import ACCEL_SETTINGS
from .disks import DISK_MODES

DEFAULT_DATA_DIR: Final = Path("/var/lib/kiln/qemu")
GUEST_ASLR: Final = ("auto", "on", "off")
_NODE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class QemuConfig:
    """Where the QEMU engine keeps its sandboxes and how it runs them.

    ``data_dir``       per-sandbox directories (``sandboxes/<id>``), saved images
                       (``saved/<id>``) and pinned image files.
    ``volumes_dir``    named volume images ``<name>.ext4`` (default ``data_dir/volumes``).
    ``image_dir``      the image cache of :mod:`kiln.images` (default: its own default).
    ``network``        the sandbox network (bridge, subnet, optional netns).
    ``accel``          ``auto`` (KVM when usable, else TCG), ``kvm`` or ``tcg``.
    ``disk_mode``      ``qcow2``: the root disk is an overlay on the pinned image (≈10 ms);
                       ``copy``: a full sparse copy (≈0.65 s for the minimal image here).
    ``templates``      create sandboxes by restoring a per-shape template snapshot (boot once,
                       then ~1 s per create) instead of booting each; see :mod:`.templates`.
    ``shared_template_ram`` clones map their template's RAM file copy-on-write instead of
                       a copy each: pages a sandbox never wrote are one page cache for
                       the shape (idle warm 512 MB sandbox 123 → 75 MiB PSS), but QEMU
                       then streams the whole RAM into the first snapshot and a fork's
                       (first stop ~1.7 s for 512 MB, ~10 s for 1 GB, against ~0.1 s;
                       see :meth:`.thermal.ThermalControl._settle`). Off by default.
    ``guest_aslr``     address space randomization inside guests: ``on``, ``off``, or
                       ``auto``: on under KVM, off under TCG, where every exec otherwise
                       translates the dynamic loader and libc anew at their random
                       addresses (exec ``true`` 45 → 32 ms, and no translation-cache
                       flush every ~80 execs). The VM, not ASLR, is the sandbox boundary.
    ``boot_timeout``   seconds from QEMU start until the agent must answer.
    ``qmp_timeout``    bound on every QMP command.
    ``snapshot_timeout`` bound on saving or loading the device state.
    ``pool_size``      warm sandboxes kept ready per prepared machine shape (0: no pool);
                       see :mod:`.pool`.
    ``pool_shapes``    shapes whose count differs from ``pool_size``: ``(image, cpus,
                       memory_mb, size)`` each.
    ``pool_memory_mb`` bound on the guest memory of all pool members together.
    ``shared_dir``     a directory every node of a cluster mounts at the same path (NFS,
                       ...): sandboxes then live in ``shared_dir/nodes/<node>/sandboxes``,
                       pinned images in ``shared_dir/bases`` and, unless ``volumes_dir``
                       says otherwise, volumes in ``shared_dir/volumes``, so that another
                       node can take over a sandbox of a lost one (see :mod:`.adoption`).
                       Its own node's directory is all a node's orphan cleanup looks at.
    ``node``           this node's name in the cluster (required with ``shared_dir``).
    """

    data_dir: Path = DEFAULT_DATA_DIR
    volumes_dir: Path | None = None
    image_dir: Path | None = None
    network: NetworkConfig = field(default_factory=NetworkConfig)
    accel: str = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    disk_mode: str = "qcow2"
    templates: bool = True
    shared_template_ram: bool = False
    tb_size_mb: int = 64
    boot_timeout: float = 90.0
    qmp_timeout: float = 10.0
    snapshot_timeout: float = 60.0
    agent_timeout: float = 10.0
    guest_user: str | None = None
    guest_aslr: str = "auto"
    pool_size: int = 0
    pool_memory_mb: int = 2048
    pool_shapes: tuple[tuple[str, int, int, int], ...] = ()
    shared_dir: Path | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        if self.accel not in ACCEL_SETTINGS:
            raise EngineUnavailable(
                f"accel must be one of {', '.join(ACCEL_SETTINGS)}, got {self.accel!r}"
            )
        if self.disk_mode not in DISK_MODES:
            raise EngineUnavailable(
                f"disk_mode must be one of {', '.join(DISK_MODES)}, got {self.disk_mode!r}"
            )
        if self.guest_aslr not in GUEST_ASLR:
            raise EngineUnavailable(
                f"guest_aslr must be one of {', '.join(GUEST_ASLR)}, got {self.guest_aslr!r}"
            )
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.volumes_dir is not None:
            object.__setattr__(self, "volumes_dir", Path(self.volumes_dir))
        if self.shared_dir is not None:
            object.__setattr__(self, "shared_dir", Path(self.shared_dir))
            if not self.shared_dir.is_absolute():
                raise EngineUnavailable(f"shared_dir must be absolute, got {self.shared_dir}")
            if self.node is None or not _NODE_NAME.match(self.node):
                raise EngineUnavailable(
                    f"a shared_dir needs this node's name (letters, digits, '.', '_', '-'),"
                    f" got {self.node!r}"
                )
        if any(shape[3] < 0 for shape in self.pool_shapes):
            raise EngineUnavailable("pool_shapes: a size must not be negative")
        if self.pool_size < 0 or self.pool_memory_mb < 0:
            raise EngineUnavailable("pool_size and pool_memory_mb must not be negative")
        for name in ("boot_timeout", "qmp_timeout", "snapshot_timeout", "agent_timeout"):
            if getattr(self, name) <= 0:
                raise EngineUnavailable(f"{name} must be positive")

    def pool_size_for(self, image: str, cpus: int, memory_mb: int) -> int:
        """How many warm sandboxes of this shape the pool keeps once it is prepared."""
        for shape in self.pool_shapes:
            if shape[:3] == (image, cpus, memory_mb):
                return shape[3]
        return self.pool_size

    @property
    def sandboxes_dir(self) -> Path:
        """This node's sandbox directories (in the shared directory when there is one)."""
        if self.shared_dir is not None:
            assert self.node is not None
            return self.nodes_dir / self.node / "sandboxes"
        return self.data_dir / "sandboxes"

    @property
    def nodes_dir(self) -> Path:
        """``shared_dir/nodes``: every node's sandboxes, each under its node's name."""
        assert self.shared_dir is not None
        return self.shared_dir / "nodes"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def saved_dir(self) -> Path:
        """Saved images (see :mod:`.saved`)."""
        return self.data_dir / "saved"

    @property
    def bases_dir(self) -> Path:
        """Pinned image files; shared, so that the backing-file path inside every root
        disk overlay (absolute) resolves on every node."""
        if self.shared_dir is not None:
            return self.shared_dir / "bases"
        return self.data_dir / "bases"

    @property
    def effective_volumes_dir(self) -> Path:
        if self.volumes_dir is not None:
            return self.volumes_dir
        if self.shared_dir is not None:
            return self.shared_dir / "volumes"
        return self.data_dir / "volumes"
