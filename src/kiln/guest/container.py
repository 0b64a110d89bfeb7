"""The agent as PID 1 of a container (the Docker engine's sandboxes).

The container runtime already did what PID 1 does in a VM: /proc, /sys, /dev
and /dev/pts are mounted, eth0 is up with its address, the host name and
/etc/resolv.conf are set, volumes are mounted. What is left is the sandbox's
own set-up, the same as in a VM (:func:`kiln.guest.pid1.apply_config`'s
user, files and directories), read from ``config.json`` bind-mounted
read-only by the engine.

There is no power-off: when the agent stops, PID 1 exits and the runtime
ends the container. ``"user_dirs"`` in the config lists the directories the
sandbox user must own at every start (a Docker volume's root belongs to root
when the volume is new).
"""

from __future__ import annotations

import logging
import os
import resource

from kiln.protocol import SANDBOX_UID

from .config import GuestConfig
from .errors import SetupError
from .started import STARTED_MARKER, first_start, mark_started

log = logging.getLogger(__name__)

NOFILE_LIMIT = 65536
WORKSPACE = "/workspace"


def boot(config: GuestConfig, *, first: bool) -> None:
    """Set up the sandbox user and its directories (and, on the first start, its files);
    log failures and go on."""
    from . import pid1  # noqa: PLC0415 - shares the VM's set-up steps

    os.umask(0o022)
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    _raise_nofile()
    uid = gid = SANDBOX_UID
    try:
        user = pid1.ensure_user(config.user)
        uid, gid = user.pw_uid, user.pw_gid
    except (OSError, SetupError) as exc:
        log.error("start: user %s: %s", config.user, exc)
    for path in (*config.user_dirs, WORKSPACE):
        try:
            os.makedirs(path, exist_ok=True)
            os.chown(path, uid, gid)
        except OSError as exc:
            log.error("start: directory %s: %s", path, exc)
    for file in config.files if first else ():
        try:
            pid1.write_owned(file.path, file.content, file.mode, uid, gid)
        except OSError as exc:
            log.error("start: file %s: %s", file.path, exc)


__all__ = ["STARTED_MARKER", "boot", "first_start", "mark_started"]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < NOFILE_LIMIT <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, hard))
