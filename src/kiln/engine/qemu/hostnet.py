"""The host side of a sandbox's network: its guest address, its TAP device, the
host's pinned ARP entry for it and its firewall rules.

Taking one raises :class:`~kiln.engine.errors.EngineError`; giving one back
only logs a failure, so that a destroy or an undo carries on with the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Mapping, Set
from typing import Any

from kiln.network import IPPool, Network, NetworkConfig, NetworkError
from kiln.network.firewall import Firewall

from ..base import SandboxSpec
from ..errors import EngineError
from ..guard import Guard
from . import disks

log = logging.getLogger(__name__)


def known_ips(vms: Mapping[str, Any], sandbox_ids: Set[str]) -> set[str]:
    """The guest addresses of ``sandbox_ids`` (VMs of ``vms``)."""
    return {vms[sid].record.ip for sid in sandbox_ids}


class HostNet:
    def __init__(self, config: NetworkConfig, firewall: Firewall | None = None) -> None:
        self._config = config
        self.network = Network(config)
        self.pool = IPPool(config.subnet)
        self.guard = Guard(firewall)

    async def admit(self, spec: SandboxSpec, ip: str, tap: str, mac: str) -> None:
        """The sandbox's firewall rules, its TAP pinned to its MAC and address."""
        await self.guard.admit(spec, ip, port=tap, mac=mac)

    def hand_over_ip(self, ip: str, sid: str) -> None:
        """``ip`` now held by ``sid`` (a pool member's address, its sandbox's now)."""
        try:
            self.pool.release(ip)
            self.pool.mark_in_use(ip, sid)
        except NetworkError as exc:
            raise EngineError(f"cannot hand {ip} to {sid}: {exc}") from exc

    def allocate_ip(self, sid: str) -> str:
        try:
            return self.pool.allocate(sid)
        except NetworkError as exc:
            raise EngineError(f"no guest address for {sid}: {exc}") from exc

    async def release_ip(self, ip: str) -> None:
        await self.forget_neighbour(ip)
        try:
            self.pool.release(ip)
        except NetworkError as exc:
            log.warning("could not release %s: %s", ip, exc)

    async def create_tap(self, sid: str, on_bridge: bool = True) -> str:
        try:
            return await asyncio.to_thread(self.network.create_tap, sid, on_bridge)
        except NetworkError as exc:
            raise EngineError(f"cannot create the TAP of {sid}: {exc}") from exc

    async def recreate_tap(self, sid: str) -> None:
        """The TAP of a recovered cold sandbox (gone after a host reboot). A failure
        is only logged: recovery goes on, and the restore will say what is wrong."""
        try:
            await asyncio.to_thread(self.network.create_tap, sid)
        except NetworkError as exc:
            log.warning("cannot re-create the TAP of %s: %s", sid, exc)

    async def set_tap_on_bridge(self, tap: str, on: bool) -> None:
        try:
            await asyncio.to_thread(self.network.set_tap_on_bridge, tap, on)
        except NetworkError as exc:
            verb = "attach" if on else "detach"
            raise EngineError(f"cannot {verb} the TAP {tap}: {exc}") from exc

    async def packet_socket(self, tap: str, ethertype: int) -> socket.socket:
        """A non-blocking AF_PACKET socket for ``ethertype`` frames on ``tap``."""
        try:
            sock = await asyncio.to_thread(self.network.packet_socket, tap, ethertype)
        except NetworkError as exc:
            raise EngineError(str(exc)) from exc
        sock.setblocking(False)
        return sock

    async def delete_tap(self, tap: str) -> None:
        try:
            await asyncio.to_thread(self.network.delete_tap, tap)
        except NetworkError as exc:
            log.warning("could not delete TAP %s: %s", tap, exc)

    # The host's ARP entry for a guest is pinned (PERMANENT, the guest's fixed MAC)
    # while the sandbox exists, and removed with it. Without the pin, connecting
    # while the guest boots leaves the entry INCOMPLETE and the kernel re-asks only
    # once a second, adding up to ~1 s before the agent is seen; and when an address
    # is reused by a new sandbox (another MAC) a stale entry sends its packets to the
    # old MAC for up to ~45 s. (``ip neigh`` for one address: ~5 ms.)

    async def pin_neighbour(self, ip: str, mac: str) -> None:
        bridge = self._config.bridge
        await self._ip_neigh("replace", ip, "lladdr", mac, "dev", bridge, "nud", "permanent")

    async def forget_neighbour(self, ip: str) -> None:
        await self._ip_neigh("flush", "to", ip, "nud", "all")

    async def forget_stale_pins(self, known_ips: Set[str]) -> list[str]:
        """Remove the pinned entries of addresses no known sandbox holds: a daemon that
        died between pinning a new sandbox's address and writing its record left
        one that nothing else names. Returns the addresses unpinned."""
        ns = self._config.netns
        argv = ["ip", *(["-n", ns] if ns else []), "-j", "neigh", "show"]
        try:
            out = await disks.run_tool([*argv, "dev", self._config.bridge, "nud", "permanent"])
            entries = json.loads(out or "[]")
        except (EngineError, ValueError) as exc:
            log.warning("cannot list the pinned guest addresses: %s", exc)
            return []
        stale = sorted({e["dst"] for e in entries if "dst" in e} - set(known_ips))
        for ip in stale:
            await self.forget_neighbour(ip)
        return stale

    async def _ip_neigh(self, *args: str) -> None:
        ns = self._config.netns
        argv = ["ip", *(["-n", ns] if ns else []), "neigh", *args]
        try:
            await disks.run_tool(argv, timeout=10)
        except EngineError as exc:
            log.warning("ip neigh %s failed: %s", " ".join(args), exc)

    async def close(self) -> None:
        await asyncio.to_thread(self.network.close)
