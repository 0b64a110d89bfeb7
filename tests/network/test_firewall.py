"""The sandbox firewall on a real bridge, with real nftables, in namespaces.

The world each test gets: kiln's bridge in a namespace of its own (the "host"),
fake sandboxes as namespaces on veths of that bridge, and an "outside"
namespace routed from the host that plays the internet (203.0.113.0/24), the
host's LAN (192.168.50.1), a cloud metadata service (169.254.169.254) and the
resolver guests are given (192.0.2.53). Every probe is a TCP connect from
inside a sandbox namespace to a greeter that names itself, so "reached" means
the intended server answered.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kiln.network import Network, NetworkConfig, OperationFailed
from kiln.network.firewall import Firewall, FirewallConfig, Member, Nft
from kiln.network.policy import NetworkPolicy

from ._nsutil import (
    DNS,
    LAN,
    METADATA,
    OUTSIDE_LINK,
    PUBLIC,
    PUBLIC_2,
    SERVER,
    TEST_SUBNET,
    Guest,
    in_ns,
    ip,
    link,
    route_outside,
)

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "nft"], capture_output=True, check=False).returncode != 0,
    reason="nft is not installed (scripts/bootstrap installs nftables)",
)

PROBE_TIMEOUT = 0.8

CONNECT = textwrap.dedent(
    """
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
        s.settimeout(2)
        print(s.recv(200).decode().split()[0])
    except OSError as exc:
        print("failed", type(exc).__name__)
    """
)


@dataclass
class World:
    host: str
    outside: str
    network: Network
    firewall: Firewall
    servers: dict[tuple[str, str, int], str]  # (namespace, address, port) -> tag
    guests: dict[str, Guest]

    def reaches(self, guest: str, ns: str, address: str, port: int) -> bool:
        """Whether a connect from sandbox ``guest`` reaches the server of ``ns``."""
        out = in_ns(
            self.guests[guest].ns,
            sys.executable,
            "-c",
            CONNECT,
            address,
            str(port),
            str(PROBE_TIMEOUT),
            check=False,
        ).stdout.strip()
        return out == self.servers[ns, address, port]

    def admit(self, name: str, group: str, policy: NetworkPolicy | None = None) -> Member:
        guest = self.guests[name]
        mac = link(guest.ns, "eth0")
        assert mac is not None
        member = Member(
            name,
            guest.ip,
            group,
            policy or NetworkPolicy(),
            port=guest.host_side,
            mac=mac["address"],
        )
        self.firewall.admit(member)
        return member


@pytest.fixture
def world(
    netns_factory: Callable[[], str],
    attach_guest: Callable[[Network, str, str], Guest],
) -> Iterator[World]:
    host = netns_factory()
    outside = netns_factory()
    network = Network(NetworkConfig(netns=host, subnet=TEST_SUBNET, dns=(DNS,)))
    procs: list[subprocess.Popen[str]] = []
    servers: dict[tuple[str, str, int], str] = {}

    def serve(ns: str, address: str, port: int) -> None:
        tag = f"{ns}-{address}-{port}"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, address, str(port), tag],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline(), f"{tag} did not start"
        servers[ns, address, port] = tag

    resolved = {"files.example": (PUBLIC_2,)}
    firewall = Firewall(
        FirewallConfig(table="kiln_test", bridges=(network.config.bridge,), netns=host, dns=(DNS,)),
        resolve=lambda name: resolved.get(name, ()),
    )
    try:
        network.setup()
        firewall.setup()
        route_outside(host, outside)
        serve(outside, DNS, 53)
        for address in (PUBLIC, PUBLIC_2, LAN):
            serve(outside, address, 443)
        serve(outside, METADATA, 80)
        serve(host, str(network.config.gateway), 8080)  # a host service on the bridge
        serve(host, OUTSIDE_LINK[0], 8080)  # ... and on another host address
        guests: dict[str, Guest] = {}
        for i, name in enumerate(("a", "b", "c", "d")):
            guest = attach_guest(network, f"10.213.77.{10 + i}", f"ktap{name}")
            guests[name] = guest
            serve(guest.ns, "0.0.0.0", 8000)
            serve(guest.ns, "0.0.0.0", 1024)
            servers[guest.ns, guest.ip, 8000] = servers[guest.ns, "0.0.0.0", 8000]
            servers[guest.ns, guest.ip, 1024] = servers[guest.ns, "0.0.0.0", 1024]
        yield World(host, outside, network, firewall, servers, guests)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        try:
            firewall.teardown()
        finally:
            network.teardown()
            network.close()


def _g(world: World, name: str) -> tuple[str, str]:
    guest = world.guests[name]
    return guest.ns, guest.ip


@pytest.mark.parametrize("br_netfilter", [True, False], ids=["br_netfilter", "bridge-only"])
def test_sandboxes_reach_their_owners_other_sandboxes_but_no_agent_port(
    world: World, br_netfilter: bool
) -> None:
    # With br_netfilter (this kernel's default) frames between two ports also pass
    # the inet rules; without it only the bridge table sees them: both must hold.
    value = "1" if br_netfilter else "0"
    in_ns(world.host, "sysctl", "-qw", f"net.bridge.bridge-nf-call-iptables={value}")
    world.admit("a", "alice")
    world.admit("b", "alice")
    world.admit("c", "bob")
    assert world.reaches("a", *_g(world, "b"), 8000)
    assert world.reaches("b", *_g(world, "a"), 8000)
    assert not world.reaches("a", *_g(world, "b"), 1024), "a same-user sandbox's agent port"
    assert not world.reaches("a", *_g(world, "c"), 8000), "another user's sandbox"
    assert not world.reaches("c", *_g(world, "a"), 8000), "another user's sandbox"


def test_the_host_itself_metadata_and_the_lan_are_closed_the_internet_open(world: World) -> None:
    world.admit("a", "alice")
    gateway = str(world.network.config.gateway)
    assert not world.reaches("a", world.host, gateway, 8080), "the host's bridge address"
    assert not world.reaches("a", world.host, OUTSIDE_LINK[0], 8080), "another host address"
    assert not world.reaches("a", world.outside, METADATA, 80), "link-local metadata"
    assert not world.reaches("a", world.outside, LAN, 443), "a private (LAN) address"
    assert world.reaches("a", world.outside, PUBLIC, 443)
    assert world.reaches("a", world.outside, DNS, 53), "the resolver guests are given"


def test_the_host_still_reaches_every_agent(world: World) -> None:
    world.admit("a", "alice")
    for name in ("a", "d"):  # d: not admitted at all
        ns, address = _g(world, name)
        out = in_ns(
            world.host, sys.executable, "-c", CONNECT, address, "1024", "2", check=False
        ).stdout.strip()
        assert out == world.servers[ns, address, 1024]


def test_egress_deny_with_an_allow_list_of_cidrs_and_domains(world: World) -> None:
    world.admit("a", "alice", NetworkPolicy("deny", allow=(f"{PUBLIC}/32",)))
    world.admit("b", "alice", NetworkPolicy("deny", allow=("files.example",)))
    assert world.reaches("a", world.outside, PUBLIC, 443)
    assert not world.reaches("a", world.outside, PUBLIC_2, 443)
    assert world.reaches("a", world.outside, DNS, 53), "DNS stays open under egress deny"
    assert world.reaches("b", world.outside, PUBLIC_2, 443), "files.example resolves to it"
    assert not world.reaches("b", world.outside, PUBLIC, 443)
    assert world.reaches("a", *_g(world, "b"), 8000), "egress policy is not about peers"


def test_egress_deny_with_nothing_allowed_closes_dns_too(world: World) -> None:
    world.admit("a", "alice", NetworkPolicy("deny"))
    world.admit("b", "alice", NetworkPolicy("deny", deny=("files.example",)))
    for name in ("a", "b"):
        assert not world.reaches(name, world.outside, DNS, 53), "no way out through DNS"
        assert not world.reaches(name, world.outside, PUBLIC, 443)
    world.admit("a", "alice", NetworkPolicy("allow"))
    assert world.reaches("a", world.outside, DNS, 53)


def test_a_deny_list_closes_what_egress_allow_opens(world: World) -> None:
    world.admit("a", "alice", NetworkPolicy("allow", deny=("203.0.113.16/28",)))
    assert world.reaches("a", world.outside, PUBLIC, 443)
    assert not world.reaches("a", world.outside, PUBLIC_2, 443)


def test_a_policy_cannot_open_what_the_daemon_blocks(world: World) -> None:
    world.admit("a", "alice", NetworkPolicy("allow", allow=(f"{LAN}/32", METADATA)))
    assert not world.reaches("a", world.outside, LAN, 443)
    assert not world.reaches("a", world.outside, METADATA, 80)


def test_domains_are_resolved_again_on_refresh(world: World) -> None:
    world.admit("a", "alice", NetworkPolicy("deny", allow=("files.example",)))
    assert world.reaches("a", world.outside, PUBLIC_2, 443)
    world.firewall._resolve = lambda name: (PUBLIC,) if name == "files.example" else ()
    assert world.firewall.refresh() is True
    assert world.reaches("a", world.outside, PUBLIC, 443)
    assert not world.reaches("a", world.outside, PUBLIC_2, 443)
    assert world.firewall.refresh() is False, "nothing changed: nothing applied"


def test_an_unknown_or_released_sandbox_reaches_nothing(world: World) -> None:
    assert not world.reaches("d", world.outside, PUBLIC, 443), "not admitted yet"
    world.admit("a", "alice")
    world.admit("b", "alice")
    assert world.reaches("a", world.outside, PUBLIC, 443)
    world.firewall.release("a")
    assert not world.reaches("a", world.outside, PUBLIC, 443)
    assert not world.reaches("b", *_g(world, "a"), 8000), "a released address is nobody's peer"
    world.firewall.release("a")  # twice: nothing to do


def test_a_sandbox_cannot_take_another_sandboxs_address(world: World) -> None:
    world.admit("a", "alice")
    world.admit("b", "bob")
    a_ns, a_ip = _g(world, "a")
    b_ip = world.guests["b"].ip
    ip("-n", a_ns, "addr", "flush", "dev", "eth0")
    ip("-n", a_ns, "addr", "add", f"{b_ip}/24", "dev", "eth0")
    ip("-n", a_ns, "route", "add", "default", "via", str(world.network.config.gateway))
    assert not world.reaches("a", world.outside, PUBLIC, 443), "spoofed source address"
    ip("-n", a_ns, "addr", "flush", "dev", "eth0")
    ip("-n", a_ns, "addr", "add", f"{a_ip}/24", "dev", "eth0")
    ip("-n", a_ns, "route", "add", "default", "via", str(world.network.config.gateway))
    assert world.reaches("a", world.outside, PUBLIC, 443)


def test_rules_are_idempotent_and_go_with_teardown(world: World) -> None:
    world.admit("a", "alice")
    nft = Nft(world.host)
    before = nft.list_table("inet", "kiln_test") + nft.list_table("bridge", "kiln_test")
    world.firewall.setup()
    world.admit("a", "alice")
    after = nft.list_table("inet", "kiln_test") + nft.list_table("bridge", "kiln_test")
    assert before == after
    assert world.guests["a"].ip in after and "ktapa" in after
    world.firewall.teardown()
    tables = in_ns(world.host, "nft", "list", "tables").stdout
    assert "kiln_test" not in tables
    assert world.reaches("c", world.outside, PUBLIC, 443), "no rules: nothing filtered"


def test_a_refused_update_changes_nothing(netns_factory: Callable[[], str]) -> None:
    ns = netns_factory()
    firewall = Firewall(FirewallConfig(table="kiln_test", bridges=("kb0",), netns=ns))
    firewall.setup()
    kept = Member("a", "10.213.77.10", "alice")
    firewall.admit(kept)
    ip("netns", "delete", ns)  # nft has nowhere to run now
    with pytest.raises(OperationFailed):
        firewall.admit(Member("b", "10.213.77.11", "alice"))
    with pytest.raises(OperationFailed):
        firewall.admit(Member("a", "10.213.77.10", "alice", NetworkPolicy("deny")))
    assert firewall.members() == {"a": kept}, "neither the new one nor the change is kept"


def test_a_batch_writes_the_rules_once_on_the_way_out(world: World) -> None:
    nft = Nft(world.host)
    with world.firewall.batch():
        world.admit("a", "alice")
        world.admit("b", "alice")
        assert world.guests["a"].ip not in nft.list_table("inet", "kiln_test"), "not yet"
    rules = nft.list_table("inet", "kiln_test")
    assert world.guests["a"].ip in rules and world.guests["b"].ip in rules
    assert world.reaches("a", *_g(world, "b"), 8000)


def test_a_transfer_gives_an_address_to_another_sandbox_in_one_update(world: World) -> None:
    # A warm-pool member (a group of its own) becomes alice's sandbox: same address
    # and port, her group and policy.
    member = world.admit("a", "pool-a")
    world.admit("b", "alice")
    assert not world.reaches("a", *_g(world, "b"), 8000)
    mine = Member(
        "alice-1", member.ip, "alice", NetworkPolicy("deny"), port=member.port, mac=member.mac
    )
    world.firewall.transfer("a", mine)
    assert set(world.firewall.members()) == {"alice-1", "b"}
    assert world.reaches("a", *_g(world, "b"), 8000), "now in alice's group"
    assert not world.reaches("a", world.outside, PUBLIC, 443), "and under her policy"


HOLD = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    f = s.makefile("rb")
    print(f.readline().decode().split()[0], flush=True)
    s.settimeout(float(sys.argv[3]))
    for line in sys.stdin:
        try:
            s.sendall(line.encode())
            print("echo" if f.readline() == line.encode() else "lost", flush=True)
        except OSError as exc:
            print("failed", type(exc).__name__, flush=True)
    """
)


class Held:
    """A TCP connection held open from namespace ``ns`` to a greeter, which echoes
    each line sent: :meth:`alive` says whether a line still comes back."""

    def __init__(self, ns: str, address: str, port: int) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", HOLD, address, str(port), "2"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.tag = self.proc.stdout.readline().strip()

    def alive(self) -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("ping\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == "echo"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def started_by(ns: str, address: str) -> int:
    """How many flows ``address`` started that the kernel tracks in ``ns``."""
    out = in_ns(ns, "cat", "/proc/net/nf_conntrack", check=False).stdout
    return sum(line.split("src=", 1)[-1].startswith(f"{address} ") for line in out.splitlines())


def test_a_new_policy_ends_the_flows_its_sandbox_started(world: World) -> None:
    world.admit("a", "alice")
    a_ns, a_ip = _g(world, "a")
    out = Held(a_ns, PUBLIC, 443)
    into = Held(world.host, a_ip, 8000)  # the host's: an exec stream, a proxied request
    try:
        assert out.tag == world.servers[world.outside, PUBLIC, 443]
        assert into.tag == world.servers[a_ns, "0.0.0.0", 8000]
        assert out.alive() and into.alive()
        world.admit("a", "alice", NetworkPolicy("deny"))
        # Without forgetting it, the flow would go on as "established".
        assert not out.alive(), "a denied destination stays reachable over an old flow"
        assert into.alive(), "the host's flows into the sandbox go on"
        assert not world.reaches("a", world.outside, PUBLIC, 443)
    finally:
        out.close()
        into.close()


def test_a_released_address_keeps_no_tracked_flows(world: World) -> None:
    world.admit("a", "alice")
    a_ns, a_ip = _g(world, "a")
    out = Held(a_ns, PUBLIC, 443)
    try:
        assert out.alive() and started_by(world.host, a_ip) == 1
        world.firewall.release("a")
        assert started_by(world.host, a_ip) == 0
        # The next sandbox with this address, denied everything, inherits no flow of
        # the one before it (nor may it send packets that match one).
        mac = link(a_ns, "eth0")
        assert mac is not None
        nobody = Member("a2", a_ip, "bob", NetworkPolicy("deny"), "ktapa", mac["address"])
        world.firewall.admit(nobody)
        assert not out.alive(), "the next sandbox rode the old one's flow"
    finally:
        out.close()
