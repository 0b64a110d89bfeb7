"""The agent as PID 1 of a container (the Docker engine's sandboxes).

The container runtime already did what PID 1 does in a VM: /proc, /sys, /dev
and /dev/pts are mounted, eth0 is up with its address, the host name and
/etc/resolv.conf are set, volumes are mounted. What is left is the sandbox's
own set-up, the same as in a VM (:func:`kiln.guest.pid1.apply_config`'s
user, files and directories), read from ``config.json`` bind-mounted
read-only by the engine.

``"network"`` in the config, where the engine plumbs eth0 itself (runc: the
container starts with ``--network none`` and the host adds a veth while the
agent starts), names the address to wait for before the init script runs, so
that init finds the network up as it does in a VM (:func:`wait_for_network`).

There is no power-off: when the agent stops, PID 1 exits and the runtime
ends the container. ``"user_dirs"`` in the config lists the directories the
sandbox user must own at every start (a Docker volume's root belongs to root
when the volume is new).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import socket
import struct
import time

from kiln.protocol import SANDBOX_UID

from .config import GuestConfig, NetworkSpec
from .errors import SetupError
from .started import STARTED_MARKER, first_start, mark_started
from .users import ensure_user, write_owned

log = logging.getLogger(__name__)

NOFILE_LIMIT = 65536
WORKSPACE = "/workspace"
SIOCGIFADDR = 0x8915
#: How long the init script waits for the host to plumb eth0 (it takes ~10 ms).
NETWORK_PATIENCE = 10.0
_NETWORK_POLL = 0.002


def boot(config: GuestConfig, *, first: bool) -> None:
    """Set up the sandbox user and its directories (and, on the first start, its files);
    log failures and go on."""
    os.umask(0o022)
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    _raise_nofile()
    uid = gid = SANDBOX_UID
    try:
        user = ensure_user(config.user)
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
            write_owned(file.path, file.content, file.mode, uid, gid)
        except OSError as exc:
            log.error("start: file %s: %s", file.path, exc)


def reconfigure(config: GuestConfig, uid: int, gid: int) -> None:
    """The container's part of a CONFIGURE (see :meth:`kiln.guest.agent.Agent._configure`),
    how a Docker warm-pool member becomes someone's sandbox: its files. The rest is
    not the container's to change: the clock and the RNG are the host kernel's (one
    clock, one entropy pool for every container: nothing to set, nothing a member
    could pass on), and the host name is set by the engine from outside (in the
    container's UTS namespace: sethostname needs CAP_SYS_ADMIN, which a sandbox never
    gets; :mod:`kiln.engine.docker.pool`). Raises OSError."""
    for file in config.files:
        write_owned(file.path, file.content, file.mode, uid, gid)


__all__ = ["STARTED_MARKER", "boot", "first_start", "mark_started", "reconfigure"]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < NOFILE_LIMIT <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, hard))


def wait_for_network(network: NetworkSpec, patience: float = NETWORK_PATIENCE) -> bool:
    """Until the interface carries its address and, with a gateway, the default route
    through it (the host adds the route last); False (logged) if that takes longer
    than ``patience`` seconds: the agent goes on without it."""
    deadline = time.monotonic() + patience
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while True:
            try:
                if _has_address(sock, network) and _has_default_route(network):
                    return True
            except OSError as exc:
                log.error("start: waiting for %s: %s", network.interface, exc)
                return False
            if time.monotonic() > deadline:
                log.error(
                    "start: %s did not get %s within %.0f s; going on without it",
                    network.interface,
                    network.address,
                    patience,
                )
                return False
            time.sleep(_NETWORK_POLL)


def _has_address(sock: socket.socket, network: NetworkSpec) -> bool:
    want = socket.inet_aton(network.address.partition("/")[0])
    try:
        answer = fcntl.ioctl(sock, SIOCGIFADDR, struct.pack("16s16x", network.interface.encode()))
    except OSError as exc:  # no such device yet, or no address on it
        if exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
            return False
        raise
    return answer[20:24] == want


def _has_default_route(network: NetworkSpec, table: str = "/proc/net/route") -> bool:
    if network.gateway is None:
        return True
    # The table prints each address as the u32 it is in memory, in host byte order.
    gateway = "{:08X}".format(*struct.unpack("=I", socket.inet_aton(network.gateway)))
    with open(table) as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[:3] == [network.interface, "00000000", gateway] for r in rows if len(r) > 2)
