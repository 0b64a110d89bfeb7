"""The sandbox network's configuration: validated on construction, no I/O."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from .errors import InvalidInput
from .naming import bridge_mac, normalize_mac, validate_ifname, validate_netns, validate_tap_prefix

PREFIXLEN = 24
_THIS_NETWORK = IPv4Network("0.0.0.0/8")
# Where the host's resolvers are listed. systemd-resolved's stub (127.0.0.53) is
# unusable from a guest, its upstream list is in the second file.
RESOLV_CONF_PATHS = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


def parse_subnet(subnet: object) -> IPv4Network:
    """A private IPv4 /24 with its host bits zero, or InvalidInput saying what is wrong."""
    if not isinstance(subnet, str | IPv4Network):
        raise InvalidInput(f"subnet must be a string like '10.213.0.0/24', got {subnet!r}")
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise InvalidInput(f"subnet {subnet!r} is not a valid network: {exc}") from exc
    if not isinstance(net, IPv4Network):
        raise InvalidInput(f"subnet {subnet!r} is not IPv4; sandbox networks are IPv4 only")
    if net.prefixlen != PREFIXLEN:
        raise InvalidInput(f"subnet {subnet!r} must be a /{PREFIXLEN} (got /{net.prefixlen})")
    special = (
        net.is_loopback
        or net.is_link_local
        or net.is_multicast
        or net.is_reserved
        or net.is_unspecified
        or net.subnet_of(_THIS_NETWORK)
    )
    if special or net.is_global:
        raise InvalidInput(
            f"subnet {subnet!r} is not a private range; use one of 10.0.0.0/8, "
            "172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10"
        )
    return net


def parse_resolv_conf(text: str) -> list[str]:
    """IPv4, non-loopback ``nameserver`` entries of a resolv.conf, in order, no duplicates.

    Loopback resolvers (systemd-resolved, dnsmasq on 127.0.0.1) are unreachable
    from a guest, and guests only have IPv4 (NAT is IPv4 only).
    """
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(fields[1])
        except ValueError:
            continue  # "fe80::1%eth0" and junk
        if isinstance(addr, IPv4Address) and not addr.is_loopback and str(addr) not in found:
            found.append(str(addr))
    return found


def host_nameservers(paths: Iterable[Path] = RESOLV_CONF_PATHS) -> list[str]:
    """The first non-empty result of :func:`parse_resolv_conf` over ``paths`` (does I/O)."""
    for path in paths:
        try:
            servers = parse_resolv_conf(path.read_text(errors="replace"))
        except OSError:
            continue
        if servers:
            return servers
    return []


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """Where sandboxes live on the network.

    ``bridge``      the Linux bridge every TAP is attached to; the gateway lives on it.
    ``subnet``      a private IPv4 /24; the gateway is ``.1``, guests get ``.2``-``.254``.
    ``bridge_mac``  fixed bridge MAC; ``None`` derives a locally administered one from
                    the bridge name (stable across re-creation, see ``naming.bridge_mac``).
    ``tap_prefix``  TAP names are ``tap_prefix`` + 8 hex characters. Every tun/tap device
                    whose name starts with it is considered kiln's (orphan cleanup deletes
                    it), so two kiln daemons on one host need different prefixes.
    ``netns``       run the whole sandbox network inside this named network namespace
                    (``/run/netns/NAME``), created by ``setup()`` if missing; ``None`` =
                    the namespace the daemon runs in.
    ``nat``         masquerade guest traffic leaving through any other interface.
    ``dns``         resolvers handed to guests; ``None`` = the host's IPv4 non-loopback
                    resolvers (resolv.conf, then systemd-resolved's upstream list),
                    read when first needed. kiln runs no DNS server of its own, so if
                    the host has none usable, guests get an empty list.
    """

    bridge: str = "kiln0"
    subnet: str = "10.213.0.0/24"
    bridge_mac: str | None = None
    tap_prefix: str = "ktap"
    netns: str | None = None
    nat: bool = True
    dns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_ifname(self.bridge, "bridge name")
        validate_tap_prefix(self.tap_prefix)
        if self.bridge.startswith(self.tap_prefix):
            raise InvalidInput(
                f"bridge name {self.bridge!r} starts with the TAP prefix {self.tap_prefix!r}; "
                "orphan cleanup would delete it"
            )
        parse_subnet(self.subnet)
        if self.bridge_mac is not None:
            object.__setattr__(self, "bridge_mac", normalize_mac(self.bridge_mac, "bridge MAC"))
        if self.netns is not None:
            validate_netns(self.netns)
        if not isinstance(self.nat, bool):
            raise InvalidInput(f"nat must be a bool, got {self.nat!r}")
        dns: object = self.dns  # checked at run time: configs come from YAML too
        if dns is not None:
            if not isinstance(dns, tuple | list):
                raise InvalidInput(f"dns must be a list of IPv4 addresses, got {dns!r}")
            cleaned: list[str] = []
            for server in dns:
                try:
                    cleaned.append(str(IPv4Address(server)))
                except ValueError as exc:
                    raise InvalidInput(f"dns server {server!r} is not an IPv4 address") from exc
            object.__setattr__(self, "dns", tuple(cleaned))

    @property
    def network(self) -> IPv4Network:
        return parse_subnet(self.subnet)

    @property
    def gateway(self) -> IPv4Address:
        return self.network.network_address + 1

    @property
    def prefixlen(self) -> int:
        return PREFIXLEN

    @property
    def effective_bridge_mac(self) -> str:
        return self.bridge_mac if self.bridge_mac is not None else bridge_mac(self.bridge)
