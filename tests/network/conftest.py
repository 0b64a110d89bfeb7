"""Fixtures for network tests: every device lives in a namespace the test made.

Each test that touches the network gets fresh named namespaces (``kt-<hex>``),
removed in a finalizer even when the test fails, so the suite is safe both
plainly and under ``scripts/test`` (which adds an ``unshare --net`` around it).
The code under test is always pointed at one of these namespaces through
``NetworkConfig(netns=...)``: the test process's own namespace is never touched.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from kiln.network import Network, NetworkConfig

from ._nsutil import (
    SERVER,
    TEST_SUBNET,
    Guest,
    Server,
    delete_netns,
    fresh_netns_name,
    ip,
    netns_unavailable,
)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], str]]:
    """Create namespaces on demand (``lo`` up); all are deleted when the test ends."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    made: list[str] = []

    def make() -> str:
        name = fresh_netns_name()
        made.append(name)
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in made:
            delete_netns(name)


@pytest.fixture
def netns(netns_factory: Callable[[], str]) -> str:
    """A fresh named namespace with only ``lo`` (up)."""
    return netns_factory()


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A name for a namespace that does not exist yet; deleted at the end if it was made."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    name = fresh_netns_name()
    try:
        yield name
    finally:
        delete_netns(name)


@pytest.fixture
def net_config(netns: str) -> NetworkConfig:
    return NetworkConfig(netns=netns, subnet=TEST_SUBNET, dns=("192.0.2.53",))


@pytest.fixture
def network(net_config: NetworkConfig) -> Iterator[Network]:
    """A set-up Network inside ``netns``; torn down and closed afterwards."""
    net = Network(net_config)
    try:
        net.setup()
        yield net
    finally:
        try:
            net.teardown()
        finally:
            net.close()


@pytest.fixture
def serve_in() -> Iterator[Callable[[str, str], Server]]:
    """Start a TCP greeter/echo server inside a namespace: ``serve_in(ns, host)``.

    On connect it sends ``"<tag> <peer address>\\n"``, then echoes.
    """
    procs: list[subprocess.Popen[str]] = []

    def start(ns: str, host: str) -> Server:
        tag = f"server-{secrets.token_hex(4)}"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, host, "0", tag],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server in {ns} on {host} did not start")
        return Server(proc, int(line), tag)

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def attach_guest(
    netns_factory: Callable[[], str],
) -> Callable[[Network, str, str], Guest]:
    """``attach_guest(network, ip, host_side_name)``: a veth guest on the bridge."""

    def attach(net: Network, address: str, host_side: str) -> Guest:
        cfg = net.config
        assert cfg.netns is not None
        guest = netns_factory()
        ip(
            "-n",
            cfg.netns,
            "link",
            "add",
            host_side,
            "type",
            "veth",
            "peer",
            "eth0",
            "netns",
            guest,
        )
        ip("-n", cfg.netns, "link", "set", host_side, "master", cfg.bridge, "up")
        ip("-n", guest, "addr", "add", f"{address}/{cfg.prefixlen}", "dev", "eth0")
        ip("-n", guest, "link", "set", "eth0", "up")
        ip("-n", guest, "route", "add", "default", "via", str(cfg.gateway))
        return Guest(guest, address, host_side)

    return attach
