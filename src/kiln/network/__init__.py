"""kiln's sandbox network: a bridge with a fixed MAC, one TAP per sandbox, NAT.

    Network(config)          setup / teardown, create_tap / delete_tap,
                             orphan_taps / cleanup_orphans, guest_network
    NetworkConfig            bridge, /24 subnet, bridge MAC, TAP prefix, netns, nat, dns
    IPPool(subnet)           guest addresses .2-.254 (pure, thread-safe)
    netns_exec_argv          start a process (QEMU) inside the namespace
    connect_in               a TCP socket connected from inside the namespace (hot path)
    open_connection_in       the same as asyncio streams

The whole network can live in a named network namespace (``NetworkConfig.netns``);
every netlink request, TAP, sysctl and iptables rule then goes there. Errors are
described in :mod:`kiln.network.errors`.
"""

from .config import NetworkConfig, host_nameservers, parse_resolv_conf, parse_subnet
from .errors import (
    AddressError,
    InvalidInput,
    NamespaceNotFound,
    NetworkError,
    OperationFailed,
    PoolExhausted,
    ToolMissing,
)
from .naming import address_mac, bridge_mac, guest_mac, tap_name
from .netns import (
    NamespaceWorker,
    close_dialer,
    connect_in,
    ensure_netns,
    netns_exec_argv,
    netns_exists,
    open_connection_in,
)
from .network import GuestNetwork, Network
from .pool import IPPool

__all__ = [
    "AddressError",
    "GuestNetwork",
    "IPPool",
    "InvalidInput",
    "NamespaceNotFound",
    "NamespaceWorker",
    "Network",
    "NetworkConfig",
    "NetworkError",
    "OperationFailed",
    "PoolExhausted",
    "ToolMissing",
    "address_mac",
    "bridge_mac",
    "close_dialer",
    "connect_in",
    "ensure_netns",
    "guest_mac",
    "host_nameservers",
    "netns_exec_argv",
    "netns_exists",
    "open_connection_in",
    "parse_resolv_conf",
    "parse_subnet",
    "tap_name",
]
