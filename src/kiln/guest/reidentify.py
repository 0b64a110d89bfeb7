"""A forked sandbox taking its own identity (VM mode, PID 1 only; stdlib only).

A fork restores a copy of a running guest's memory: the clone wakes up as its
source, with the source's hostname, address, MAC, token, clock and RNG state,
and nothing in its memory tells it otherwise. The host tells it, while its TAP
is still off the bridge, in one of two ways; one thread waits for both
(blocked in epoll: free while nothing happens):

* an **identity frame** (:mod:`.forkframe`) on eth0, carrying the agent's current
  token; the clone answers with an acknowledgement frame once it has taken the
  identity. The host's first choice: the network receive path is warm for the
  first request after it.
* an **identity block** appended to the config drive
  (:data:`~kiln.guest.config.IDENTITY_MAGIC`, a length, identity JSON), which
  grows by :data:`~kiln.guest.config.IDENTITY_BLOCK` (QMP ``block_resize``); the
  guest kernel announces the new size with a ``change`` uevent carrying
  ``RESIZE=1`` on a kobject netlink socket, and the block is read with a
  ``pread`` at the end of the disk (no mount: an ext4 mount cost ~200 ms under
  TCG, where every code path runs for the first time in a new QEMU).

Either way, if it names another sandbox (or this one with another network: the
same sandbox taken over by another node of a cluster) it takes that identity once: RNG
reseed and clock, eth0 (MAC, address, default route), hostname, resolv.conf and
the agent's token, then says so on the console
(:data:`~kiln.guest.config.FORK_READY_LINE`). Processes, sessions and files are
untouched: they are the fork's point. Afterwards the config drive is mounted
afresh (the old mount was the source's file system, now overwritten), a
little later, in a thread that gives way to the agent.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from . import forkframe, netconf, pid1
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
#: Thread priority of the config drive's remount after a fork (the lowest), and how
#: many seconds it waits: the clone's first requests come first.
_POLITE_NICE = 19
_REMOUNT_DELAY = 2.0


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


def take_identity(config: GuestConfig, inet: socket.socket | None) -> None:
    """What makes a restored copy another sandbox (each step logs its own failure).
    ``inet``: a datagram socket for the interface ioctls (None: the boot's way)."""
    pid1.catch_up_clock(config)
    if config.network is not None:
        if inet is None:
            pid1._step("network", netconf.configure, config.network)
        else:
            pid1._step("network", netconf.reconfigure, config.network, inet)
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


def _remount_later(device: str) -> None:
    """:func:`remount_drive`, :data:`_REMOUNT_DELAY` s after the identity was taken,
    at the lowest priority: an ext4 mount is ~200 ms of guest CPU under TCG, and
    translating new code stalls the whole guest whatever the thread's priority
    (measured: 25-40 ms more on the clone's first request when done at once).
    Until then the old mount shows the source's config drive as it was cached."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _POLITE_NICE)
    time.sleep(_REMOUNT_DELAY)
    pid1._step("remount the config drive", remount_drive, device)


class IdentityWatch:
    """The thread that waits for a fork's identity: on an Ethernet frame (the host's
    first choice, see :mod:`.forkframe`) and on the config drive's resize (for a
    host that does not send frames). Whichever brings it first, it is taken once."""

    def __init__(
        self,
        device: str,
        sandbox_id: str | None,
        on_new: Callable[[GuestConfig], None],
        *,
        interface: str | None = None,
        current_token: Callable[[], str | None] = lambda: None,
        network: NetworkSpec | None = None,
    ) -> None:
        self._device = device
        self._sandbox_id = sandbox_id
        #: A block naming this sandbox is new only with another network: the same
        #: sandbox taken over by another host of a cluster (its address from there).
        self._network = network
        self._on_new = on_new
        self._interface = interface
        self._current_token = current_token
        self._lock = threading.Lock()
        self._inet: socket.socket | None = None

    def start(self) -> threading.Thread | None:
        """The watching thread (None if there is nothing to watch)."""
        handlers: dict[socket.socket, Callable[[socket.socket], None]] = {}
        try:
            uevents = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
            uevents.bind((0, _KERNEL_GROUP))
        except OSError as exc:
            log.error("fork: cannot watch for uevents (%s): forks of this sandbox fail", exc)
        else:
            handlers[uevents] = self._on_uevent
        frames = self._frame_socket()
        if frames is not None:
            handlers[frames] = self._on_frame
        if not handlers:
            return None
        thread = threading.Thread(
            target=self._serve, args=(handlers,), name="kiln-fork", daemon=True
        )
        thread.start()
        return thread

    @staticmethod
    def _serve(handlers: dict[socket.socket, Callable[[socket.socket], None]]) -> None:
        """One thread for both ways: blocked in epoll, it costs nothing until a fork."""
        with selectors.DefaultSelector() as selector:
            for sock, handler in handlers.items():
                selector.register(sock, selectors.EVENT_READ, handler)
            while True:
                for key, _ in selector.select():
                    key.data(key.fileobj)

    def _frame_socket(self) -> socket.socket | None:
        """The socket identity frames arrive on, and the one their ioctls go through;
        None (frames unused: the config drive still works) if either fails."""
        if self._interface is None:
            return None
        proto = socket.htons(forkframe.ETHERTYPE)
        try:
            frames = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, proto)
        except OSError as exc:
            log.warning("fork: no identity frames on %s (%s)", self._interface, exc)
            return None
        try:
            frames.bind((self._interface, forkframe.ETHERTYPE))
            self._inet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            frames.close()
            log.warning("fork: no identity frames on %s (%s)", self._interface, exc)
            return None
        return frames

    # ------------------------------------------------------------------ frames

    def _on_frame(self, sock: socket.socket) -> None:
        try:
            payload, sender = sock.recvfrom(_RECV_SIZE)
        except OSError as exc:
            log.debug("fork: frame socket: %s", exc)
            return
        started = time.monotonic()
        parsed = forkframe.parse_identity_frame(payload)
        if parsed is None:
            return
        previous, data = parsed
        try:
            config = GuestConfig.from_json(data)
        except ConfigError as exc:
            log.error("fork: a bad identity frame: %s", exc)
            return

        def ack(sandbox_id: str) -> None:
            answer = forkframe.ack_frame(sandbox_id)
            try:
                sock.sendto(answer, (sender[0], sender[1], 0, 0, sender[4]))
            except (OSError, IndexError) as exc:
                log.error("fork: cannot acknowledge the identity: %s", exc)

        self._take(config, started, previous, ack)

    # ------------------------------------------------------------------ config drive

    def _on_uevent(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(_RECV_SIZE)
        except OSError as exc:  # ENOBUFS: a burst overflowed the socket; keep going
            log.debug("fork: uevent socket: %s", exc)
            return
        if is_drive_resize(parse_uevent(data), self._device):
            self._on_resize()

    def _on_resize(self) -> None:
        started = time.monotonic()
        try:
            config = read_identity(self._device)
        except (OSError, ConfigError) as exc:
            log.error("fork: cannot read the identity block: %s", exc)
            return
        if config is not None:
            self._take(config, started, None, None)

    # ------------------------------------------------------------------ taking it

    def _take(
        self,
        config: GuestConfig,
        started: float,
        previous_token: str | None,
        ack: Callable[[str], None] | None,
    ) -> None:
        """Take ``config`` if it names another sandbox. A frame (``ack`` given) must
        carry the current token (``previous_token``); one repeating the identity
        taken already is acknowledged again (the host resends until it hears)."""
        with self._lock:
            new = config.sandbox_id
            if new is None or (new == self._sandbox_id and config.network == self._network):
                if ack is not None and new is not None and self._authentic(config.token):
                    ack(new)
                return
            if ack is not None and not self._authentic(previous_token):
                log.warning("fork: an identity frame without the agent's token: ignored")
                return
            read = time.monotonic()
            source, self._sandbox_id = self._sandbox_id, new
            self._network = config.network
            take_identity(config, self._inet)
            try:
                self._on_new(config)
            except Exception:
                log.exception("fork: the agent could not take the new identity")
            if ack is not None:
                ack(new)
        log.info(
            "%s %s, forked from %s (%s; read in %.0f ms, set in %.0f ms)",
            FORK_READY_LINE,
            new,
            source,
            "frame" if ack is not None else "config drive",
            (read - started) * 1000,
            (time.monotonic() - read) * 1000,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        threading.Thread(
            target=_remount_later, args=(self._device,), name="kiln-fork-mount", daemon=True
        ).start()

    def _authentic(self, token: str | None) -> bool:
        current = self._current_token()
        return (
            token is not None
            and current is not None
            and hmac.compare_digest(token.encode(), current.encode())
        )
