"""Traffic through the bridge: fake guests (veth peers in their own namespaces).

A TAP carries traffic only once QEMU attaches to it, so these tests put veth
pairs on the bridge instead, with the far ends in one namespace per "guest".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from kiln.network import Network, NetworkConfig, open_connection_in

from ._nsutil import TEST_SUBNET, Guest, Server, ip, ping

pytestmark = pytest.mark.netns


async def _greeting(ns: str, host: str, port: int, connect_timeout: float = 5.0) -> list[str]:
    reader, writer = await open_connection_in(ns, host, port, timeout=connect_timeout)
    try:
        line = (await reader.readline()).decode().split()
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        return line
    finally:
        writer.close()
        await writer.wait_closed()


async def test_two_guests_talk_across_the_bridge(
    network: Network,
    attach_guest: Callable[[Network, str, str], Guest],
    serve_in: Callable[[str, str], Server],
) -> None:
    cfg = network.config
    assert cfg.netns is not None
    g1 = attach_guest(network, "10.213.77.2", "kveth1")
    g2 = attach_guest(network, "10.213.77.3", "kveth2")

    assert await asyncio.to_thread(ping, g1.ns, g2.ip)
    assert await asyncio.to_thread(ping, g2.ns, g1.ip)
    assert await asyncio.to_thread(ping, g1.ns, str(cfg.gateway))
    assert await asyncio.to_thread(ping, cfg.netns, g2.ip)

    server = serve_in(g2.ns, "0.0.0.0")
    # Guest to guest: bridged, so not masqueraded (the server sees the real peer).
    assert await _greeting(g1.ns, g2.ip, server.port) == [server.tag, g1.ip]
    # Host (gateway) to guest: this is how the daemon reaches a guest agent.
    assert await _greeting(cfg.netns, g2.ip, server.port) == [server.tag, str(cfg.gateway)]


def _uplink(network: Network, netns_factory: Callable[[], str]) -> str:
    """An "internet" namespace on a veth off the sandbox namespace, with no route back."""
    cfg = network.config
    assert cfg.netns is not None
    uplink = netns_factory()
    peer = ("peer", "name", "eth0", "netns", uplink)
    ip("-n", cfg.netns, "link", "add", "kup0", "type", "veth", *peer)
    ip("-n", cfg.netns, "addr", "add", "192.168.77.1/24", "dev", "kup0")
    ip("-n", cfg.netns, "link", "set", "kup0", "up")
    ip("-n", uplink, "addr", "add", "192.168.77.2/24", "dev", "eth0")
    ip("-n", uplink, "link", "set", "eth0", "up")
    return uplink


async def test_nat_masquerades_guest_egress(
    network: Network,
    netns_factory: Callable[[], str],
    attach_guest: Callable[[Network, str, str], Guest],
    serve_in: Callable[[str, str], Server],
) -> None:
    uplink = _uplink(network, netns_factory)
    guest = attach_guest(network, "10.213.77.9", "kveth1")
    server = serve_in(uplink, "0.0.0.0")
    # The uplink has no route to the guest subnet: only a masqueraded
    # connection (source rewritten to kup0's address) can be answered.
    assert await _greeting(guest.ns, "192.168.77.2", server.port) == [server.tag, "192.168.77.1"]


async def test_without_nat_egress_is_not_masqueraded(
    net_config: NetworkConfig,
    netns_factory: Callable[[], str],
    attach_guest: Callable[[Network, str, str], Guest],
    serve_in: Callable[[str, str], Server],
) -> None:
    assert net_config.netns is not None
    config = NetworkConfig(netns=net_config.netns, subnet=TEST_SUBNET, nat=False)
    with Network(config) as network:
        network.setup()
        uplink = _uplink(network, netns_factory)
        guest = attach_guest(network, "10.213.77.9", "kveth1")
        server = serve_in(uplink, "0.0.0.0")
        with pytest.raises(TimeoutError):
            await _greeting(guest.ns, "192.168.77.2", server.port, connect_timeout=1.0)
