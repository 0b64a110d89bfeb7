"""A forked sandbox taking its own identity (VM mode, PID 1 only; stdlib only).

A fork restores a copy of a running guest's memory: the clone wakes up as its
source, with the source's hostname, address, MAC, token, clock and RNG state,
and nothing in its memory tells it otherwise. What differs is its config drive:
the host wrote the clone's own ``config.json`` in the same slot. The host then
grows that disk (QMP ``block_resize``), which the guest kernel announces with a
``change`` uevent carrying ``RESIZE=1``; this module's thread waits for that
uevent on a kobject netlink socket (a blocked ``recv``: free while nothing
happens, unlike polling the drive), re-reads the drive, and if it names another
sandbox takes its identity: RNG reseed and clock, hostname, resolv.conf, eth0
(MAC, address, default route) and the agent's token. Processes, sessions and
files are untouched: they are the fork's point.

The host keeps the clone's TAP off the bridge until the console shows
:data:`~kiln.guest.config.FORK_READY_LINE`, so the clone never speaks on the
sandbox network with its source's addresses.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from . import netconf, pid1
from .config import CONFIG_FILE, CONFIG_MOUNT, FORK_READY_LINE, GuestConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
_KERNEL_GROUP = 1
_RECV_SIZE = 1 << 16


def parse_uevent(data: bytes) -> dict[str, str]:
    """The KEY=VALUE fields of a kernel uevent (``action@devpath\\0KEY=VALUE\\0...``)."""
    out: dict[str, str] = {}
    for part in data.split(b"\0")[1:]:
        key, sep, value = part.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def is_drive_resize(event: dict[str, str], device: str) -> bool:
    return (
        event.get("ACTION") == "change"
        and event.get("DEVNAME") == os.path.basename(device)
        and event.get("RESIZE") == "1"
    )


def reread_drive(device: str) -> GuestConfig:
    """Mount the config drive afresh (the old mount and cached blocks are the
    source's drive) and load its config."""
    import fcntl  # noqa: PLC0415

    if os.path.ismount(CONFIG_MOUNT):
        pid1.umount(CONFIG_MOUNT)
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, pid1.BLKFLSBUF)
    finally:
        os.close(fd)
    os.makedirs(CONFIG_MOUNT, exist_ok=True)
    flags = pid1.MS_RDONLY | pid1.MS_NOSUID | pid1.MS_NODEV | pid1.MS_NOEXEC
    pid1.mount(device, CONFIG_MOUNT, "ext4", flags)
    return GuestConfig.load(Path(CONFIG_MOUNT) / CONFIG_FILE)


def take_identity(config: GuestConfig) -> None:
    """What makes a restored copy another sandbox (each step logs its own failure)."""
    pid1.catch_up_clock(config)
    if config.hostname:
        pid1._step("hostname", pid1.set_hostname, config.hostname)
    if config.dns:
        pid1._step("resolv.conf", pid1.write_resolv_conf, config.dns)
    if config.network is not None:
        pid1._step("network", netconf.configure, config.network)


class IdentityWatch:
    """The thread that waits for a fork's new config drive."""

    def __init__(
        self, device: str, sandbox_id: str | None, on_new: Callable[[GuestConfig], None]
    ) -> None:
        self._device = device
        self._sandbox_id = sandbox_id
        self._on_new = on_new

    def start(self) -> threading.Thread | None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
            sock.bind((0, _KERNEL_GROUP))
        except OSError as exc:
            log.error("fork: cannot watch for uevents (%s): forks of this sandbox fail", exc)
            return None
        thread = threading.Thread(target=self._run, args=(sock,), name="kiln-fork", daemon=True)
        thread.start()
        return thread

    def _run(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(_RECV_SIZE)
            except OSError as exc:  # ENOBUFS: a burst overflowed the socket; keep going
                log.debug("fork: uevent socket: %s", exc)
                continue
            if not is_drive_resize(parse_uevent(data), self._device):
                continue
            try:
                config = reread_drive(self._device)
            except (OSError, ConfigError) as exc:
                log.error("fork: cannot read the new config drive: %s", exc)
                continue
            if config.sandbox_id == self._sandbox_id:
                continue
            log.info("fork: %s becomes %s", self._sandbox_id, config.sandbox_id)
            self._sandbox_id = config.sandbox_id
            take_identity(config)
            try:
                self._on_new(config)
            except Exception:
                log.exception("fork: the agent could not take the new identity")
            log.info("%s %s", FORK_READY_LINE, config.sandbox_id)
            for handler in logging.getLogger().handlers:
                handler.flush()
