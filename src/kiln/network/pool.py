"""Guest IP addresses of one /24: ``.2``-``.254``, lowest free first.

Pure bookkeeping, no I/O; thread-safe. Persisting who holds what is the daemon's
job: after a restart it calls :meth:`IPPool.mark_in_use` for every sandbox it
recovers, before allocating anything new.
"""

from __future__ import annotations

import threading
from ipaddress import IPv4Address, IPv4Network

from .config import parse_subnet
from .errors import AddressError, InvalidInput, PoolExhausted

FIRST_HOST = 2  # .1 is the gateway on the bridge
LAST_HOST = 254  # .255 is the broadcast address


class IPPool:
    """One address per owner (an owner is normally a sandbox id)."""

    def __init__(self, subnet: str | IPv4Network) -> None:
        self._net = parse_subnet(subnet)
        base = self._net.network_address
        self._candidates = tuple(base + i for i in range(FIRST_HOST, LAST_HOST + 1))
        self._owner_by_ip: dict[IPv4Address, str] = {}
        self._ip_by_owner: dict[str, IPv4Address] = {}
        self._lock = threading.Lock()

    @property
    def subnet(self) -> IPv4Network:
        return self._net

    @property
    def size(self) -> int:
        return len(self._candidates)

    def allocate(self, owner: str) -> str:
        """The lowest free address, now held by ``owner``.

        Idempotent per owner: an owner that already holds an address gets that
        same address back (a retried create must not leak addresses).
        """
        _check_owner(owner)
        with self._lock:
            held = self._ip_by_owner.get(owner)
            if held is not None:
                return str(held)
            for ip in self._candidates:
                if ip not in self._owner_by_ip:
                    self._take(ip, owner)
                    return str(ip)
        raise PoolExhausted(
            f"no free guest address left in {self._net} ({self.size} addresses in use)"
        )

    def release(self, ip: str | IPv4Address) -> None:
        """Free ``ip``. Releasing an address that is already free is not an error."""
        addr = self._check_ip(ip)
        with self._lock:
            owner = self._owner_by_ip.pop(addr, None)
            if owner is not None:
                del self._ip_by_owner[owner]

    def mark_in_use(self, ip: str | IPv4Address, owner: str) -> None:
        """Record that ``owner`` holds ``ip`` (recovery after a restart).

        Idempotent for the same pair; raises AddressError if ``ip`` belongs to
        another owner or ``owner`` already holds a different address.
        """
        _check_owner(owner)
        addr = self._check_ip(ip)
        with self._lock:
            current = self._owner_by_ip.get(addr)
            if current == owner:
                return
            if current is not None:
                raise AddressError(f"{addr} is already held by {current!r}, not {owner!r}")
            held = self._ip_by_owner.get(owner)
            if held is not None:
                raise AddressError(f"{owner!r} already holds {held}; cannot also hold {addr}")
            self._take(addr, owner)

    def owner_of(self, ip: str | IPv4Address) -> str | None:
        addr = self._check_ip(ip)
        with self._lock:
            return self._owner_by_ip.get(addr)

    def address_of(self, owner: str) -> str | None:
        with self._lock:
            held = self._ip_by_owner.get(owner)
        return None if held is None else str(held)

    def in_use(self) -> dict[str, str]:
        """A snapshot: address → owner."""
        with self._lock:
            return {str(ip): owner for ip, owner in sorted(self._owner_by_ip.items())}

    def free_count(self) -> int:
        with self._lock:
            return self.size - len(self._owner_by_ip)

    def _take(self, ip: IPv4Address, owner: str) -> None:
        self._owner_by_ip[ip] = owner
        self._ip_by_owner[owner] = ip

    def _check_ip(self, ip: str | IPv4Address) -> IPv4Address:
        return guest_address(self._net, ip)


def guest_address(subnet: IPv4Network, ip: object) -> IPv4Address:
    """``ip`` as an address, if it is one of the guest addresses (.2-.254) of ``subnet``."""
    if not isinstance(ip, str | IPv4Address):
        raise InvalidInput(f"{ip!r} is not an IPv4 address")
    try:
        addr = IPv4Address(ip)
    except ValueError as exc:
        raise InvalidInput(f"{ip!r} is not an IPv4 address") from exc
    offset = int(addr) - int(subnet.network_address)
    if not FIRST_HOST <= offset <= LAST_HOST:
        raise InvalidInput(
            f"{addr} is not a guest address of {subnet} (guests use .{FIRST_HOST}-.{LAST_HOST})"
        )
    return addr


def _check_owner(owner: object) -> None:
    if not isinstance(owner, str) or not owner:
        raise InvalidInput(f"pool owner must be a non-empty string, got {owner!r}")
