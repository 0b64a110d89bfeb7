"""Whether this sandbox has been set up before: first boot vs every later one.

The spec's files and its init script are one-time provisioning: written and
run on the sandbox's first boot, never again. A later boot of the same disk --
a container started after a stop, a VM booted again after its machine was lost
(a host reboot) -- must not write the spec's files over what the user changed
since, nor run the init script a second time; like a machine that reboots, it
keeps its disk and sets up only what does not survive a reboot (network,
mounts, host name). The marker lives in the sandbox's own root file system,
so it is exactly as durable as the user's files.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

STARTED_MARKER = "/var/lib/kiln/started"


def first_start(marker: str = STARTED_MARKER) -> bool:
    return not os.path.exists(marker)


def mark_started(marker: str = STARTED_MARKER, *, durable: bool = False) -> None:
    """Leave the marker; ``durable``: on stable storage before returning (a VM whose
    machine is killed a moment later must not provision itself again at its next
    boot; the fsync also commits the ext4 journal with the files written before)."""
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable:
            dfd = os.open(os.path.dirname(marker), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        log.error("start: %s: %s", marker, exc)
