"""A forked sandbox taking its own identity (VM mode, PID 1 only; stdlib only).

A fork restores a copy of a running guest's memory: the clone wakes up as its
source, with the source's hostname, address, MAC, token, clock and RNG state,
and nothing in its memory tells it otherwise. What differs is its config drive:
the host wrote the clone's own config drive in the same slot, and once the
clone runs, appends an *identity block* after it
(:data:`~kiln.guest.config.IDENTITY_MAGIC`, a length, identity JSON) and grows
the disk by :data:`~kiln.guest.config.IDENTITY_BLOCK` (QMP ``block_resize``).
The guest kernel announces the new size with a ``change`` uevent carrying
``RESIZE=1``; this module's thread waits for it on a kobject netlink socket (a
blocked ``recv``: free while nothing happens, unlike polling the drive), reads
the block -- a ``pread`` at the end of the disk, no mount: under TCG every code
path runs for the first time in a new QEMU, and an ext4 mount cost ~200 ms --
and if it names another sandbox (or this one with another network: the same
sandbox taken over by another node of a cluster) takes its identity: RNG reseed and clock,
hostname, resolv.conf, eth0 (MAC, address, default route) and the agent's token.
Processes, sessions and files are untouched: they are the fork's point.
Afterwards the config drive is mounted afresh (the old mount was the source's
file system, now overwritten).

The host keeps the clone's TAP off the bridge until the console shows
:data:`~kiln.guest.config.FORK_READY_LINE`, so the clone never speaks on the
sandbox network with its source's addresses.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from . import netconf, pid1
from .config import (
    CONFIG_MOUNT,
    FORK_READY_LINE,
    IDENTITY_BLOCK,
    GuestConfig,
    NetworkSpec,
    parse_identity,
)
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


def read_identity(device: str) -> GuestConfig | None:
    """The identity block at the end of ``device``, or None."""
    import fcntl  # noqa: PLC0415

    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, pid1.BLKFLSBUF)  # what we cached of it is the source's drive
        start = os.lseek(fd, 0, os.SEEK_END) - IDENTITY_BLOCK
        if start < 0:
            return None
        return parse_identity(
            os.pread(fd, 4096, start), lambda off, n: os.pread(fd, n, start + off)
        )
    finally:
        os.close(fd)


def take_identity(config: GuestConfig) -> None:
    """What makes a restored copy another sandbox (each step logs its own failure)."""
    pid1.catch_up_clock(config)
    if config.network is not None:
        pid1._step("network", netconf.configure, config.network)
    if config.hostname:
        pid1._step("hostname", pid1.set_hostname, config.hostname)
    if config.dns:
        pid1._step("resolv.conf", pid1.write_resolv_conf, config.dns)


def remount_drive(device: str) -> None:
    """Mount the (new) config drive where the source's was."""
    if os.path.ismount(CONFIG_MOUNT):
        pid1.umount(CONFIG_MOUNT, pid1.MNT_DETACH)
    flags = pid1.MS_RDONLY | pid1.MS_NOSUID | pid1.MS_NODEV | pid1.MS_NOEXEC
    pid1.mount(device, CONFIG_MOUNT, "ext4", flags)


class IdentityWatch:
    """The thread that waits for a fork's identity block."""

    def __init__(
        self,
        device: str,
        sandbox_id: str | None,
        on_new: Callable[[GuestConfig], None],
        network: NetworkSpec | None = None,
    ) -> None:
        self._device = device
        self._sandbox_id = sandbox_id
        #: A block naming this sandbox is new only with another network: the same
        #: sandbox taken over by another host of a cluster (its address from there).
        self._network = network
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
            if is_drive_resize(parse_uevent(data), self._device):
                self._on_resize()

    def _on_resize(self) -> None:
        started = time.monotonic()
        try:
            config = read_identity(self._device)
        except (OSError, ConfigError) as exc:
            log.error("fork: cannot read the identity block: %s", exc)
            return
        if config is None or (
            config.sandbox_id == self._sandbox_id and config.network == self._network
        ):
            return
        read = time.monotonic()
        source, self._sandbox_id = self._sandbox_id, config.sandbox_id
        self._network = config.network
        take_identity(config)
        try:
            self._on_new(config)
        except Exception:
            log.exception("fork: the agent could not take the new identity")
        log.info(
            "%s %s, forked from %s (read in %.0f ms, set in %.0f ms)",
            FORK_READY_LINE,
            config.sandbox_id,
            source,
            (read - started) * 1000,
            (time.monotonic() - read) * 1000,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        pid1._step("remount the config drive", remount_drive, self._device)
