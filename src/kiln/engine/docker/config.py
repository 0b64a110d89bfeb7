"""What makes one private dockerd: :class:`DockerdConfig`, validated on construction, no I/O.

Every path lives under one directory, ``ROOT``::

    ROOT/daemon.json        dockerd's config: only the runtimes (runsc); rewritten on every start
    ROOT/data/              --data-root: images, containers, volumes, checkpoints
    ROOT/data/containerd/   containerd's root (its content store: checkpoints pass through it)
    ROOT/run/               --exec-root: run-time state, removed after every stop
    ROOT/run/containerd/    containerd's state, config (containerd.toml), pid file and socket
    ROOT/docker.sock        the API socket (unless ``socket`` says otherwise)
    ROOT/dockerd.pid        --pidfile
    ROOT/dockerd.log        dockerd's and containerd's output, appended
    ROOT/runsc              the runsc wrapper, when this host needs it (:mod:`.runsc`)

``ROOT/data`` and ``ROOT/run`` must not be mount points themselves: after a
crash everything mounted at or below them is dockerd's and gets unmounted. Put
a dedicated disk at ``ROOT`` or above.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from kiln.network.config import NetworkConfig
from kiln.network.errors import InvalidInput
from kiln.network.naming import validate_ifname, validate_netns

#: ``sun_path`` holds 108 bytes including the terminating NUL.
SUN_PATH_MAX: Final = 107


@dataclass(frozen=True)
class DockerdConfig:
    """One private dockerd (and the containerd under it).

    ``root``             the directory that holds all of it (layout in the module docstring).
    ``socket``           the API socket; ``None`` = ``ROOT/docker.sock``.
    ``netns``            run dockerd and containerd inside this named network namespace
                         (``/run/netns/NAME``, which must exist); ``None`` = the caller's.
    ``bridge``           an existing bridge for the default network; ``None`` = none at all.
    ``iptables``         let dockerd write iptables rules (default: kiln.network owns them).
    ``storage_driver``   ``overlay2``; ``vfs`` where overlayfs cannot be used.
    ``cgroup_parent``    ``None`` = ``/kiln-dockerd-<hash of root>``.
    ``runsc``            the runsc program (a name on ``PATH`` or a path); ``None`` = no runsc.
    ``runsc_args``       extra runsc flags (``--platform=...``), placed before the subcommand.
    ``experimental``     needed for ``docker checkpoint``.
    ``shutdown_timeout`` dockerd's ``--shutdown-timeout``; ``Dockerd.stop`` waits this + 10 s.
    ``log_level``        dockerd's and containerd's ``--log-level`` (``warn``: what matters).
    ``dockerd``          the dockerd program (a name on ``PATH`` or a path).
    ``containerd``       the containerd program (a name on ``PATH`` or a path).
    """

    root: Path
    socket: Path | None = None
    netns: str | None = None
    bridge: str | None = None
    iptables: bool = False
    storage_driver: str = "overlay2"
    cgroup_parent: str | None = None
    runsc: str | None = "runsc"
    runsc_args: tuple[str, ...] = ()
    experimental: bool = True
    shutdown_timeout: int = 10
    log_level: str = "warn"
    dockerd: str = "dockerd"
    containerd: str = "containerd"

    def __post_init__(self) -> None:
        root = Path(self.root)
        if not root.is_absolute():
            raise ValueError(f"dockerd root must be an absolute path, got {str(root)!r}")
        object.__setattr__(self, "root", root)
        sock = root / "docker.sock" if self.socket is None else Path(self.socket)
        if not sock.is_absolute():
            raise ValueError(f"dockerd socket must be an absolute path, got {str(sock)!r}")
        object.__setattr__(self, "socket", sock)
        if self.cgroup_parent is None:
            digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
            object.__setattr__(self, "cgroup_parent", f"/kiln-dockerd-{digest}")
        parent = self.cgroup_parent or ""
        if not parent.startswith("/") or ".." in parent.split("/") or parent.strip("/") == "":
            raise ValueError(f"cgroup_parent must be an absolute cgroup path, got {parent!r}")
        # containerd's ttrpc socket is the longest socket path derived from the root.
        for path in (sock, Path(f"{self.containerd_socket}.ttrpc")):
            if len(os.fsencode(path)) > SUN_PATH_MAX:
                raise ValueError(
                    f"socket path {str(path)!r} is longer than {SUN_PATH_MAX} bytes; "
                    "choose a shorter dockerd root"
                )
        try:
            if self.netns is not None:
                validate_netns(self.netns)
            if self.bridge is not None:
                validate_ifname(self.bridge, "bridge name")
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        if self.bridge == "none":
            raise ValueError("bridge 'none' is spelled bridge=None")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if not re.fullmatch(r"[a-z0-9]+", self.storage_driver):
            raise ValueError(f"storage driver {self.storage_driver!r} is not a driver name")
        if self.log_level not in ("debug", "info", "warn", "error", "fatal"):
            raise ValueError(f"log level {self.log_level!r} is not one of dockerd's")

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def exec_root(self) -> Path:
        return self.root / "run"

    @property
    def socket_path(self) -> Path:
        assert self.socket is not None  # set in __post_init__
        return self.socket

    @property
    def url(self) -> str:
        """The Docker SDK's ``base_url`` for this daemon."""
        return f"unix://{self.socket_path}"

    @property
    def pidfile(self) -> Path:
        return self.root / "dockerd.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def config_file(self) -> Path:
        return self.root / "daemon.json"

    @property
    def runsc_wrapper_path(self) -> Path:
        return self.root / "runsc"

    @property
    def containerd_root(self) -> Path:
        return self.data_root / "containerd"

    @property
    def containerd_dir(self) -> Path:
        """containerd's run-time directory: its state, config, pid file and sockets."""
        return self.exec_root / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.containerd_dir / "containerd.toml"

    @property
    def containerd_pidfile(self) -> Path:
        return self.containerd_dir / "containerd.pid"


#: The runtimes the Docker engine knows (each sandbox picks one).
RUNTIMES: Final = ("runc", "runsc")


@dataclass(frozen=True, slots=True)
class DockerEngineConfig:
    """``state_dir``   records, guest configs and agent zipapps (``STATE/sandboxes/<id>``)
    ``dockerd``       the private dockerd to start or adopt
    ``network``       kiln's bridge for containers (its own, not the VMs')
    ``runtime``       the default runtime
    ``image_dir``     kiln.images' cache (None: its default)
    ``start_dockerd`` False: use a dockerd already answering at ``dockerd.socket``
    ``pool_size``     warm-pool members kept per pooled shape (0: no pool; :mod:`.pool`)
    ``pool_memory_mb`` the members' memory limits together at most
    """

    state_dir: Path
    dockerd: DockerdConfig
    network: NetworkConfig = field(
        default_factory=lambda: NetworkConfig(
            bridge="kilnd0", subnet="10.213.1.0/24", tap_prefix="kdtap"
        )
    )
    runtime: str = "runc"
    image_dir: Path | None = None
    start_dockerd: bool = True
    agent_timeout: float = 10.0
    boot_timeout: float = 60.0
    pool_size: int = 0
    pool_memory_mb: int = 2048

    def __post_init__(self) -> None:
        if self.pool_size < 0 or self.pool_memory_mb < 0:
            raise ValueError("pool_size and pool_memory_mb must not be negative")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def network_name(self) -> str:
        """The Docker network (a bridge network on kiln's own bridge) its sandboxes join."""
        return f"kiln-{self.network.bridge}"

    @property
    def owner(self) -> str:
        """Labels what this engine made, so another kiln sharing the dockerd keeps its own."""
        return hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:16]
