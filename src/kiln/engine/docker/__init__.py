"""The Docker engine's groundwork: a private dockerd that kiln starts, probes and stops.

    DockerdConfig(root=...)             one private dockerd: paths, bridge, runtimes (.config)
    Dockerd(config)                     start() (or adopt) / stop() / client()     (.daemon)
    probe(url, runtimes=("runsc",))     is a usable dockerd answering there? -> DaemonInfo
    cleanup_leftovers(config)           what a crashed one left: processes, mounts, cgroups
    runsc_wrapper, ...                  gVisor's runsc and this host's workaround (.runsc)
    processes, mounts, cgroups          the /proc and cgroupfs side of cleaning up (.host)

The engine itself (sandboxes as containers running the guest agent, runc or
gVisor's runsc per sandbox) comes later and builds on this. Test and benchmark
helpers (a dockerd in a network namespace of its own, a busybox image made
without a registry) are in :mod:`.testing`.
"""

from .config import DockerdConfig
from .daemon import DaemonInfo, Dockerd, Leftovers, cleanup_leftovers, probe
from .errors import DockerdError, DockerdNotInstalled, DockerdStartFailed, DockerdUnavailable

__all__ = [
    "DaemonInfo",
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
