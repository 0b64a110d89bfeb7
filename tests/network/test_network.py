"""Network against the real kernel, inside namespaces made by each test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.network import (
    InvalidInput,
    Network,
    NetworkConfig,
    NetworkError,
    OperationFailed,
    ToolMissing,
    address_mac,
    bridge_mac,
    guest_mac,
    netns,
    netns_exists,
)

from ._nsutil import (
    TEST_SUBNET,
    delete_netns,
    in_ns,
    ip,
    iptables_rules,
    ipv4_addresses,
    link,
    ping,
)

pytestmark = pytest.mark.netns

HOST_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
needs_iptables = pytest.mark.skipif(shutil.which("iptables") is None, reason="no iptables")


def _assert_bridge(ns: str, cfg: NetworkConfig) -> None:
    br = link(ns, cfg.bridge)
    assert br is not None
    assert br["linkinfo"]["info_kind"] == "bridge"
    assert br["address"] == cfg.effective_bridge_mac == bridge_mac(cfg.bridge)
    assert "UP" in br["flags"]
    assert ipv4_addresses(ns, cfg.bridge) == [f"{cfg.gateway}/24"]
    assert in_ns(ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


def test_setup_is_idempotent(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    _assert_bridge(cfg.netns, cfg)
    before = link(cfg.netns, cfg.bridge)
    network.setup()
    _assert_bridge(cfg.netns, cfg)
    after = link(cfg.netns, cfg.bridge)
    assert before is not None and after is not None
    assert after["ifindex"] == before["ifindex"]  # not re-created


def test_setup_never_touches_the_callers_namespace(net_config: NetworkConfig) -> None:
    forward_before = HOST_IP_FORWARD.read_text()
    links_before = ip("-br", "link").stdout
    with Network(net_config) as net:
        net.setup()
        net.create_tap("sb-1")
        net.teardown()
    assert HOST_IP_FORWARD.read_text() == forward_before
    assert ip("-br", "link").stdout == links_before


def test_setup_converges_a_tampered_bridge(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    ip("-n", cfg.netns, "link", "set", cfg.bridge, "down")
    ip("-n", cfg.netns, "link", "set", cfg.bridge, "address", "02:00:00:00:00:99")
    ip("-n", cfg.netns, "addr", "add", "10.99.0.1/24", "dev", cfg.bridge)
    ip("-n", cfg.netns, "addr", "del", f"{cfg.gateway}/24", "dev", cfg.bridge)
    network.setup()
    _assert_bridge(cfg.netns, cfg)


def test_bridge_mac_stays_fixed_when_ports_come_and_go(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    taps = [network.create_tap(f"sb-{i}") for i in range(4)]
    # Without a fixed MAC, a bridge takes the lowest MAC of its ports.
    ip("-n", cfg.netns, "link", "set", taps[0], "address", "02:00:00:00:00:01")
    for tap in taps:
        network.delete_tap(tap)
    network.setup()
    br = link(cfg.netns, cfg.bridge)
    assert br is not None and br["address"] == cfg.effective_bridge_mac


def test_setup_creates_a_missing_namespace(netns_name: str) -> None:
    assert not netns_exists(netns_name)
    cfg = NetworkConfig(netns=netns_name, subnet=TEST_SUBNET, nat=False)
    with Network(cfg) as net:
        net.setup()
        assert netns_exists(netns_name)
        _assert_bridge(netns_name, cfg)
        net.teardown()
        assert link(netns_name, cfg.bridge) is None


def test_setup_refuses_a_non_bridge_under_the_bridge_name(net_config: NetworkConfig) -> None:
    assert net_config.netns is not None
    ip("-n", net_config.netns, "link", "add", net_config.bridge, "type", "veth")
    with Network(net_config) as net, pytest.raises(OperationFailed, match="not a bridge"):
        net.setup()


def test_setup_after_namespace_was_recreated_under_the_same_name(
    net_config: NetworkConfig,
) -> None:
    ns = net_config.netns
    assert ns is not None
    with Network(net_config) as net:
        net.setup()
        ip("netns", "del", ns)
        ip("netns", "add", ns)
        assert link(ns, net_config.bridge) is None
        net.setup()  # the worker notices the new namespace and re-enters
        _assert_bridge(ns, net_config)
        assert net.create_tap("sb-1") in net.list_taps()


@needs_iptables
def test_nat_rules_are_installed_once(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    network.setup()
    network.setup()
    rules = iptables_rules(cfg.netns)
    tag = f'--comment "kiln:{cfg.bridge}"'
    ours = [r for r in rules if tag in r]
    assert len(ours) == 3, rules
    masq = [r for r in ours if r.startswith("-A POSTROUTING")]
    assert len(masq) == 1
    assert f"-s {TEST_SUBNET} ! -o {cfg.bridge}" in masq[0]
    assert masq[0].endswith("-j MASQUERADE")
    forward = [r for r in ours if r.startswith("-A FORWARD")]
    assert {f"-i {cfg.bridge}" in r for r in forward} == {True, False}
    assert any("RELATED,ESTABLISHED" in r and f"-o {cfg.bridge}" in r for r in forward)


@needs_iptables
def test_turning_nat_off_and_teardown_remove_our_rules(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    in_ns(cfg.netns, "iptables", "-A", "FORWARD", "-i", "someone-else", "-j", "ACCEPT")
    with Network(NetworkConfig(netns=cfg.netns, subnet=TEST_SUBNET, nat=False)) as plain:
        plain.setup()
    assert not any("kiln:" in r for r in iptables_rules(cfg.netns))
    network.setup()
    assert sum("kiln:" in r for r in iptables_rules(cfg.netns)) == 3
    network.teardown()
    network.teardown()  # nothing left: still fine
    rules = iptables_rules(cfg.netns)
    assert rules == ["-A FORWARD -i someone-else -j ACCEPT"]
    assert link(cfg.netns, cfg.bridge) is None


def test_missing_iptables_is_reported_before_anything_changes(
    net_config: NetworkConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert net_config.netns is not None
    ip_tool = shutil.which("ip")
    assert ip_tool is not None
    (tmp_path / "ip").symlink_to(ip_tool)
    monkeypatch.setenv("PATH", str(tmp_path))  # `ip` but no `iptables`
    monkeypatch.setattr(netns, "SBIN_DIRS", ())  # ... not even in /usr/sbin
    with Network(net_config) as net, pytest.raises(ToolMissing, match="'iptables' program"):
        net.setup()
    assert link(net_config.netns, net_config.bridge) is None
    with Network(NetworkConfig(netns=net_config.netns, subnet=TEST_SUBNET, nat=False)) as net:
        net.setup()  # without NAT there is nothing to ask iptables
        net.teardown()


def test_tap_create_attach_delete(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    name = network.create_tap("sb-abc")
    assert name == network.tap_name("sb-abc")
    assert name.startswith("ktap") and len(name) == 12
    tap = link(cfg.netns, name)
    assert tap is not None
    assert tap["linkinfo"]["info_kind"] == "tun"
    assert tap["linkinfo"]["info_data"]["type"] == "tap"
    assert tap["linkinfo"]["info_data"]["persist"] is True
    assert tap["linkinfo"]["info_data"]["pi"] is False
    assert tap["master"] == cfg.bridge
    assert "UP" in tap["flags"]
    assert tap["ifalias"] == "kiln:sb-abc"

    assert network.create_tap("sb-abc") == name  # idempotent
    assert network.list_taps() == [name]

    network.delete_tap(name)
    assert link(cfg.netns, name) is None
    network.delete_tap(name)  # already gone: fine
    assert network.list_taps() == []


def test_attach_container_plumbs_eth0_into_the_process_namespace(
    network: Network, netns_factory: Callable[[], str]
) -> None:
    cfg = network.config
    assert cfg.netns is not None
    guest = netns_factory()  # a container's namespace: only lo
    proc = subprocess.Popen(["ip", "netns", "exec", guest, "sleep", "60"])
    inside = os.stat(f"/run/netns/{guest}").st_ino
    while os.stat(f"/proc/{proc.pid}/ns/net").st_ino != inside:  # until ip has entered it
        time.sleep(0.001)
    try:
        address = "10.213.77.9"
        name = network.attach_container("sb-c", proc.pid, address)
        assert name == network.tap_name("sb-c")
        host_end = link(cfg.netns, name)
        assert host_end is not None
        assert host_end["linkinfo"]["info_kind"] == "veth"
        assert host_end["master"] == cfg.bridge
        assert host_end["ifalias"] == "kiln:sb-c"
        assert "UP" in host_end["flags"]
        eth0 = link(guest, "eth0")
        assert eth0 is not None
        assert eth0["address"] == address_mac(address) == "02:42:0a:d5:4d:09"
        assert "UP" in eth0["flags"]
        assert ipv4_addresses(guest, "eth0") == [f"{address}/24"]
        routes = ip("-n", guest, "-j", "route", "show", "default").stdout
        assert json.loads(routes)[0]["gateway"] == str(cfg.gateway)
        assert ping(cfg.netns, address)  # the bridge's side reaches it
        assert ping(guest, str(cfg.gateway))

        assert network.attach_container("sb-c", proc.pid, address) == name  # idempotent
        assert network.list_taps() == []  # a veth, not one of the TAPs
        with pytest.raises(OperationFailed, match="is not a TAP"):
            network.create_tap("sb-c")
    finally:
        proc.kill()
        proc.wait()
    delete_netns(guest)  # what a container's end does: the pair goes with its namespace
    deadline = time.monotonic() + 5
    while link(cfg.netns, name) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link(cfg.netns, name) is None


def test_attach_container_replaces_the_pair_of_a_previous_namespace(
    network: Network, netns_factory: Callable[[], str]
) -> None:
    """A restarted container has a new namespace while the kernel may not have
    destroyed the old one (and the pair in it) yet."""
    cfg = network.config
    assert cfg.netns is not None
    procs = []
    try:
        for guest in (netns_factory(), netns_factory()):
            proc = subprocess.Popen(["ip", "netns", "exec", guest, "sleep", "60"])
            procs.append((guest, proc))
            inside = os.stat(f"/run/netns/{guest}").st_ino
            while os.stat(f"/proc/{proc.pid}/ns/net").st_ino != inside:
                time.sleep(0.001)
            network.attach_container("sb-r", proc.pid, "10.213.77.11")
        (old, _), (new, _) = procs
        assert link(old, "eth0") is None  # went with the old pair
        assert ipv4_addresses(new, "eth0") == ["10.213.77.11/24"]
        assert ping(cfg.netns, "10.213.77.11")
    finally:
        for _, proc in procs:
            proc.kill()
            proc.wait()


def test_detach_and_orphan_veths_go_at_once(
    network: Network, netns_factory: Callable[[], str]
) -> None:
    """The kernel deletes a pair only when it destroys the container's namespace,
    which it may do seconds later: destroy and clean-up delete the host end now."""
    cfg = network.config
    assert cfg.netns is not None
    procs = []
    try:
        for sid, address in (("sb-x", "10.213.77.21"), ("sb-y", "10.213.77.22")):
            guest = netns_factory()
            proc = subprocess.Popen(["ip", "netns", "exec", guest, "sleep", "60"])
            procs.append(proc)
            inside = os.stat(f"/run/netns/{guest}").st_ino
            while os.stat(f"/proc/{proc.pid}/ns/net").st_ino != inside:
                time.sleep(0.001)
            network.attach_container(sid, proc.pid, address)
        network.detach_container("sb-x")
        assert link(cfg.netns, network.tap_name("sb-x")) is None
        network.detach_container("sb-x")  # already gone: fine
        assert network.cleanup_orphan_veths({"sb-y"}) == []
        assert network.cleanup_orphan_veths(set()) == [network.tap_name("sb-y")]
        assert link(cfg.netns, network.tap_name("sb-y")) is None
        tap = network.create_tap("sb-t")  # a TAP is none of its business
        assert network.cleanup_orphan_veths(set()) == []
        with pytest.raises(OperationFailed, match="not this sandbox's veth"):
            network.detach_container("sb-t")
        assert link(cfg.netns, tap) is not None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_attach_container_of_a_gone_process_fails_clearly(network: Network) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(OperationFailed, match=f"process {proc.pid}"):
        network.attach_container("sb-d", proc.pid, "10.213.77.10")
    assert link(network.config.netns or "", network.tap_name("sb-d")) is None


def test_create_tap_repairs_a_detached_tap(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    name = network.create_tap("sb-1")
    ip("-n", cfg.netns, "link", "set", name, "nomaster")
    ip("-n", cfg.netns, "link", "set", name, "down")
    network.create_tap("sb-1")
    tap = link(cfg.netns, name)
    assert tap is not None and tap["master"] == cfg.bridge and "UP" in tap["flags"]


def test_create_tap_detects_a_name_collision(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    name = network.create_tap("sb-1")
    # Pretend another sandbox id hashed to the same name.
    ip("-n", cfg.netns, "link", "set", name, "alias", "kiln:sb-other")
    with pytest.raises(OperationFailed, match="already belongs to 'sb-other'"):
        network.create_tap("sb-1")


def test_create_tap_needs_the_bridge(net_config: NetworkConfig) -> None:
    with Network(net_config) as net, pytest.raises(OperationFailed, match=r"call Network.setup"):
        net.create_tap("sb-1")


def test_delete_tap_refuses_foreign_names(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    with pytest.raises(InvalidInput, match="not a kiln TAP"):
        network.delete_tap("lo")
    with pytest.raises(InvalidInput, match="TAP name"):
        network.delete_tap("ktap/../x")
    ip("-n", cfg.netns, "link", "add", "ktapveth", "type", "veth")
    with pytest.raises(OperationFailed, match="not a TAP device"):
        network.delete_tap("ktapveth")
    assert link(cfg.netns, "ktapveth") is not None


def test_orphan_cleanup(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    keep = network.create_tap("sb-keep")
    orphans = sorted(network.create_tap(f"sb-gone-{i}") for i in range(3))
    ip("-n", cfg.netns, "link", "add", "ktapveth", "type", "veth")  # ours by name, not a TAP
    ip("-n", cfg.netns, "tuntap", "add", "othertap", "mode", "tap")  # a TAP, not our prefix

    assert network.orphan_taps({keep}) == orphans
    assert network.orphan_taps({keep, *orphans}) == []
    assert network.cleanup_orphans({keep}) == orphans
    assert network.list_taps() == [keep]
    for name in orphans:
        assert link(cfg.netns, name) is None
    assert link(cfg.netns, "ktapveth") is not None
    assert link(cfg.netns, "othertap") is not None
    assert network.cleanup_orphans({keep}) == []


def test_teardown_removes_taps_and_bridge(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    taps = [network.create_tap(f"sb-{i}") for i in range(2)]
    network.teardown()
    assert link(cfg.netns, cfg.bridge) is None
    for name in taps:
        assert link(cfg.netns, name) is None


def test_teardown_of_a_missing_namespace_is_a_no_op(netns_name: str) -> None:
    with Network(NetworkConfig(netns=netns_name)) as net:
        net.teardown()
    assert not netns_exists(netns_name)


def test_guest_network(network: Network) -> None:
    got = network.guest_network("10.213.77.5", "sb-1")
    assert got == {
        "address": "10.213.77.5/24",
        "gateway": "10.213.77.1",
        "dns": ["192.0.2.53"],
        "mac": guest_mac("sb-1"),
    }
    assert network.mac_for("sb-1") == got["mac"]
    for bad in ("10.213.77.1", "10.213.77.255", "10.213.0.5", "nope"):
        with pytest.raises(InvalidInput):
            network.guest_network(bad, "sb-1")
    with pytest.raises(InvalidInput, match="sandbox id"):
        network.guest_network("10.213.77.5", "")


def test_dns_defaults_to_the_namespaces_resolv_conf_view(netns_name: str) -> None:
    # No I/O happens until asked; then /etc/netns/NAME/resolv.conf (missing
    # here) is skipped and the host's usable resolvers are used.
    net = Network(NetworkConfig(netns=netns_name))
    servers = net.dns_servers()
    assert all(not s.startswith("127.") for s in servers)
    net.close()


async def test_methods_work_from_inside_an_event_loop(network: Network) -> None:
    # pyroute2's sync API breaks inside a running loop; ours runs on the worker.
    name = network.create_tap("sb-async")
    assert await asyncio.to_thread(network.list_taps) == [name]


def test_closed_network_refuses_work(net_config: NetworkConfig) -> None:
    net = Network(net_config)
    net.close()
    net.close()
    with pytest.raises(NetworkError, match="closed"):
        net.setup()


def test_many_taps(network: Network) -> None:
    names = {network.create_tap(f"sb-{i}") for i in range(40)}
    assert len(names) == 40
    assert network.cleanup_orphans(set()) == sorted(names)
