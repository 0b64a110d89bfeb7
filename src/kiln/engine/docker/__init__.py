"""The Docker engine: sandboxes as containers of a private dockerd kiln starts itself.

    DockerEngine(DockerEngineConfig(...))  the engine (.engine): containers running the
                                        guest agent as PID 1, runc or runsc per sandbox
    containers, images, record          its Docker API calls, rootfs import, on-disk record
    pool, hostname, box                 its warm pool of paused runc containers, the host
                                        name set from outside, what it holds per container

    DockerdConfig(root=...)             one private dockerd: paths, bridge, runtimes (.config)
    Dockerd(config)                     start() (or adopt) / stop() / client()     (.daemon)
    probe(url, runtimes=("runsc",))     is a usable dockerd answering there? -> DaemonInfo
    cleanup_leftovers(config)           what a crashed one left: processes, mounts, cgroups
    runsc_wrapper, ...                  gVisor's runsc and this host's workaround (.runsc)
    processes, mounts, cgroups          the /proc and cgroupfs side of cleaning up (.host)

Test and benchmark helpers (a dockerd in a network namespace of its own, a
busybox image made without a registry, an engine on it) are in :mod:`.testing`.
"""

from .config import DockerdConfig, DockerEngineConfig
from .daemon import DaemonInfo, Dockerd, Leftovers, cleanup_leftovers, probe
from .engine import DockerEngine
from .errors import DockerdError, DockerdNotInstalled, DockerdStartFailed, DockerdUnavailable

__all__ = [
    "DaemonInfo",
    "DockerEngine",
    "DockerEngineConfig",
    "Dockerd",
    "DockerdConfig",
    "DockerdError",
    "DockerdNotInstalled",
    "DockerdStartFailed",
    "DockerdUnavailable",
    "Leftovers",
    "cleanup_leftovers",
    "probe",
]
