"""What sandboxes may reach, enforced on the host with nftables.

kiln owns two tables, ``inet <table>`` and ``bridge <table>``, and nothing else:
every change renders the whole ruleset from the sandboxes the firewall knows
(:class:`Member`) and replaces both tables in one ``nft -f`` transaction. So
rules are idempotent by construction, a crash between two changes leaves either
the old ruleset or the new one, and a sandbox's rules go when it goes.

Rules, for traffic that enters from a sandbox bridge (every engine's):

* to the host itself (``inet`` input): only replies and DNS to the resolvers
  guests were given; everything else is rejected, on every host address.
* routed elsewhere (``inet`` forward), first match wins: replies; DNS to the
  given resolvers; link-local 169.254.0.0/16 (cloud metadata) rejected; any
  sandbox's agent ports rejected; another sandbox only when both have the same
  owner (``group``); then the daemon-wide ``blocked`` ranges, then the
  sandbox's own :class:`~kiln.network.policy.NetworkPolicy`. A source address
  the firewall does not know (a sandbox not admitted yet) reaches nothing.
* between two ports of one bridge (``bridge`` forward: frames that are never
  routed): agent ports dropped, other sandboxes only within the group.
* anti-spoofing (``bridge`` prerouting): a port that belongs to a sandbox (a
  VM's TAP) may only send from that sandbox's MAC and IPv4 address, in IP and
  ARP alike, and no IPv6. Containers get no port here: without CAP_NET_ADMIN and
  CAP_NET_RAW (the Docker engine drops both) they cannot forge either.

Domain names in policies are resolved by the daemon (``getaddrinfo``) when a
sandbox is admitted and again every ``refresh_s``; the addresses in effect are
those of the last resolution. A name that does not resolve matches nothing.

The bridge family has no ``reject`` and no bridge-name match on every kernel
(this one lacks both), so frames between ports are dropped silently and matched
by address, not by bridge: the addresses are kiln's own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import conntrack
from .errors import InvalidInput, OperationFailed, ToolMissing
from .naming import validate_ifname, validate_netns
from .netns import ensure_netns, find_tool, netns_exec_argv
from .policy import NetworkPolicy, is_domain, parse_target

log = logging.getLogger(__name__)

AGENT_PORTS = (1024, 1025)
LINK_LOCAL = "169.254.0.0/16"
#: What ``blocked`` holds unless configured: the private and shared ranges a host's
#: LAN, VPC or carrier network lives in. Sandboxes reach each other by their own rules.
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
NFT_TIMEOUT = 30.0
_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_REJECT = "reject with icmpx type admin-prohibited"

Resolver = Callable[[str], tuple[str, ...]]


def table_name(bridge: str) -> str:
    """kiln's table name for the daemon whose VM bridge is ``bridge``: one per daemon."""
    return "kiln_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def resolve_ipv4(domain: str) -> tuple[str, ...]:
    """The IPv4 addresses ``domain`` resolves to (empty when it does not)."""
    try:
        infos = socket.getaddrinfo(domain, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return ()
    return tuple(sorted({str(info[4][0]) for info in infos}))


@dataclass(frozen=True, slots=True)
class Member:
    """A sandbox as the firewall sees it.

    ``group``  sandboxes of one group (their owner) may reach each other.
    ``port``   the bridge port only this sandbox sends through (a VM's TAP), pinned to
               ``mac`` and ``ip``; None when the engine itself prevents forgery.
    """

    sandbox_id: str
    ip: str
    group: str
    policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    port: str | None = None
    mac: str | None = None

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.ip)
        except ValueError as exc:
            raise InvalidInput(f"{self.ip!r} is not an IPv4 address") from exc
        if self.port is not None:
            validate_ifname(self.port, "bridge port")


@dataclass(frozen=True, slots=True)
class FirewallConfig:
    """``table``   the name of kiln's two nftables tables (one per daemon).
    ``bridges``    every sandbox bridge (the VMs', the containers').
    ``dns``        the resolvers guests are given: port 53 there stays open.
    ``blocked``    CIDRs no sandbox reaches whatever its policy says.
    ``default``    the policy of a sandbox created without one.
    """

    table: str
    bridges: tuple[str, ...]
    netns: str | None = None
    dns: tuple[str, ...] = ()
    blocked: tuple[str, ...] = PRIVATE_RANGES
    default: NetworkPolicy = field(default_factory=NetworkPolicy)
    refresh_s: float = 60.0

    def __post_init__(self) -> None:
        if not _TABLE_RE.match(self.table):
            raise InvalidInput(f"{self.table!r} is not a usable nftables table name")
        if not self.bridges:
            raise InvalidInput("the firewall needs at least one bridge")
        for bridge in self.bridges:
            validate_ifname(bridge, "bridge name")
        if self.netns is not None:
            validate_netns(self.netns)
        for server in self.dns:
            ipaddress.IPv4Address(server)
        blocked = tuple(parse_target(b) for b in self.blocked)
        if any(is_domain(b) for b in blocked):
            raise InvalidInput("blocked holds CIDRs only, not domain names")
        object.__setattr__(self, "blocked", blocked)
        if self.refresh_s <= 0:
            raise InvalidInput(f"refresh_s must be positive, got {self.refresh_s!r}")


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _elements(items: Iterable[str]) -> str:
    listed = list(items)
    return f" elements = {_set(listed)};" if listed else ""


def _addresses(targets: Iterable[str], resolved: Mapping[str, tuple[str, ...]]) -> list[str]:
    """CIDRs, with each domain replaced by its addresses, merged for an interval set."""
    nets: list[ipaddress.IPv4Network] = []
    for target in targets:
        if is_domain(target):
            nets.extend(ipaddress.IPv4Network(a) for a in resolved.get(target, ()))
        else:
            nets.append(ipaddress.IPv4Network(target))
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def _egress_rules(
    policy: NetworkPolicy, blocked: list[str], resolved: Mapping[str, tuple[str, ...]]
) -> list[str]:
    rules = [f"ip daddr {_set(blocked)} {_REJECT}"] if blocked else []
    allow = _addresses(policy.allow, resolved)
    deny = _addresses(policy.deny, resolved)
    if allow:
        rules.append(f"ip daddr {_set(allow)} accept")
    if deny:
        rules.append(f"ip daddr {_set(deny)} {_REJECT}")
    rules.append("accept" if policy.egress == "allow" else _REJECT)
    return rules


def render(
    config: FirewallConfig,
    members: Iterable[Member],
    resolved: Mapping[str, tuple[str, ...]] | None = None,
) -> str:
    """The ``nft -f`` script that replaces kiln's tables with rules for ``members`` (pure)."""
    resolved = resolved or {}
    members = sorted(members, key=lambda m: m.ip)
    table = config.table
    bridges = _set(f'"{b}"' for b in config.bridges)
    ips = [m.ip for m in members]
    agent_ports = _set(str(p) for p in AGENT_PORTS)
    blocked = _addresses(config.blocked, {})

    groups: dict[str, list[str]] = {}
    for m in members:
        groups.setdefault(m.group, []).append(m.ip)
    group_chain = {g: f"group_{i}" for i, g in enumerate(sorted(groups))}
    group_chains = [
        f"  chain {group_chain[g]} {{ ip daddr {_set(groups[g])} accept; }}" for g in sorted(groups)
    ]
    peers = _elements(f"{m.ip} : jump {group_chain[m.group]}" for m in members)

    policies: dict[tuple[str, ...], str] = {}
    egress_map: list[str] = []
    egress_chains: list[str] = []
    for m in members:
        rules = tuple(_egress_rules(m.policy, blocked, resolved))
        name = policies.get(rules)
        if name is None:
            name = policies[rules] = f"egress_{len(policies)}"
            body = "".join(f"    {r}\n" for r in rules)
            egress_chains.append(f"  chain {name} {{\n{body}  }}")
        egress_map.append(f"{m.ip} : jump {name}")

    dns = _elements(config.dns)
    # A sandbox denied everything has no name to look up: its DNS is closed too, or
    # queries through the resolver would be a way out (DNS tunnelling).
    nodns = _elements(m.ip for m in members if not m.policy.needs_dns)
    dns_rule = "ip saddr != @nodns ip daddr @dns meta l4proto { tcp, udp } th dport 53 accept"
    ports = [m for m in members if m.port is not None]
    port_names = [f'"{m.port}"' for m in ports]
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        f"  set sandboxes {{ type ipv4_addr;{_elements(ips)} }}",
        f"  set dns {{ type ipv4_addr;{dns} }}",
        f"  set nodns {{ type ipv4_addr;{nodns} }}",
        *group_chains,
        *egress_chains,
        f"  map peers {{ type ipv4_addr : verdict;{peers} }}",
        f"  map egress {{ type ipv4_addr : verdict;{_elements(egress_map)} }}",
        "  chain to_host {",
        "    ct state established,related accept",
        f"    {dns_rule}",
        f"    {_REJECT}",
        "  }",
        "  chain from_sandbox {",
        "    ct state established,related accept",
        f"    {dns_rule}",
        f"    ip daddr {LINK_LOCAL} {_REJECT}",
        f"    ip daddr @sandboxes tcp dport {agent_ports} {_REJECT}",
        "    ip daddr @sandboxes ip saddr vmap @peers",
        f"    ip daddr @sandboxes {_REJECT}",
        "    ip saddr vmap @egress",
        f"    {_REJECT}",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter - 10; policy accept;",
        f"    iifname {bridges} jump to_host",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy accept;",
        f"    iifname {bridges} jump from_sandbox",
        "  }",
        "}",
        f"table bridge {table} {{}}",
        f"delete table bridge {table}",
        f"table bridge {table} {{",
        f"  set sandboxes {{ type ipv4_addr;{_elements(ips)} }}",
        f"  set ports {{ type ifname;{_elements(port_names)} }}",
        "  set port_addrs { type ifname . ipv4_addr;"
        + _elements(f'"{m.port}" . {m.ip}' for m in ports)
        + " }",
        "  set port_macs { type ifname . ether_addr;"
        + _elements(f'"{m.port}" . {m.mac}' for m in ports if m.mac is not None)
        + " }",
        *group_chains,
        f"  map peers {{ type ipv4_addr : verdict;{peers} }}",
        "  chain prerouting {",
        "    type filter hook prerouting priority filter - 10; policy accept;",
        "    iifname @ports iifname . ether saddr != @port_macs drop",
        "    iifname @ports ether type ip iifname . ip saddr != @port_addrs drop",
        "    iifname @ports ether type arp iifname . arp saddr ip != @port_addrs drop",
        "    iifname @ports ether type != { ip, arp } drop",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy accept;",
        f"    ip daddr @sandboxes tcp dport {agent_ports} drop",
        "    ip daddr @sandboxes ip saddr vmap @peers",
        "    ip daddr @sandboxes drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def removal(table: str) -> str:
    """The ``nft -f`` script that removes kiln's tables (no error when they are absent)."""
    return "".join(
        f"table {family} {table} {{}}\ndelete table {family} {table}\n"
        for family in ("inet", "bridge")
    )


class Nft:
    """``nft -f -`` inside namespace ``ns`` (None: the current one)."""

    def __init__(self, ns: str | None) -> None:
        self._ns = ns

    @staticmethod
    def require() -> str:
        exe = find_tool("nft")
        if exe is None:
            raise ToolMissing(
                "the 'nft' program is not on PATH; install the nftables package "
                "(apt-get install nftables), or turn sandbox isolation off with "
                "firewall.enabled: false (sandboxes then reach everything the host does)"
            )
        return exe

    def apply(self, script: str) -> None:
        argv = netns_exec_argv(self._ns, [self.require(), "-f", "-"])
        try:
            proc = subprocess.run(
                argv, input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise OperationFailed(f"nft did not finish in {NFT_TIMEOUT} s") from exc
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
            raise OperationFailed(f"nft refused kiln's ruleset: {detail}")

    def list_table(self, family: str, table: str) -> str:
        argv = netns_exec_argv(self._ns, [self.require(), "list", "table", family, table])
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
        if proc.returncode != 0:
            raise OperationFailed(f"nft list table {family} {table}: {proc.stderr.strip()}")
        return proc.stdout


class Firewall:
    """kiln's rules for the sandboxes it knows; blocking and thread-safe.

    :meth:`setup` installs the rules for no sandbox (everything from a bridge but
    replies and DNS closed); :meth:`admit` adds a sandbox before it runs anything,
    :meth:`release` removes it. :meth:`refresh` re-resolves policy domain names.
    """

    def __init__(self, config: FirewallConfig, resolve: Resolver = resolve_ipv4) -> None:
        self.config = config
        self._nft = Nft(config.netns)
        self._resolve = resolve
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._resolved: dict[str, tuple[str, ...]] = {}
        self._applied: str | None = None
        self._held = False

    def members(self) -> dict[str, Member]:
        with self._lock:
            return dict(self._members)

    def setup(self) -> None:
        """Install the rules (for the sandboxes admitted so far); creates the
        configured namespace if it is missing, as :meth:`Network.setup` does. A
        missing ``nft`` is reported before anything is touched."""
        Nft.require()
        if self.config.netns is not None:
            ensure_netns(self.config.netns)
        with self._lock:
            self._applied = None
            self._apply_locked()

    def teardown(self) -> None:
        """Remove kiln's tables (tests, uninstall); the firewall stays usable."""
        with self._lock:
            self._nft.apply(removal(self.config.table))
            self._applied = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Admits and releases in the block change what the firewall knows; the rules
        are written once, on the way out (one ``nft`` run instead of one per sandbox,
        for a daemon start that re-admits every sandbox it recovers)."""
        with self._lock:
            self._held = True
        try:
            yield
        finally:
            with self._lock:
                self._held = False
                try:
                    self._apply_locked()
                except OperationFailed as exc:
                    # Fail closed: who is not in the rules reaches nothing; the next
                    # change writes them all again.
                    log.error("firewall: writing the rules failed: %s", exc)

    def admit(self, member: Member) -> None:
        """Rules for ``member`` (replacing any earlier ones of that sandbox)."""
        missing = [d for d in member.policy.domains if d not in self._resolved]
        found = self._lookup(missing)
        with self._lock:
            self._resolved.update(found)
            before = self._members.get(member.sandbox_id)
            self._members[member.sandbox_id] = member
            try:
                self._apply_locked()
            except BaseException:
                if before is None:
                    del self._members[member.sandbox_id]
                else:
                    self._members[member.sandbox_id] = before
                raise
        if before is not None and before != member:
            # A new policy holds for the flows it starts from now on, and for the old.
            self._forget({before.ip, member.ip}, started_only=True)

    def transfer(self, old_id: str, member: Member) -> None:
        """Rules for ``member`` instead of sandbox ``old_id``'s, written in one update."""
        missing = [d for d in member.policy.domains if d not in self._resolved]
        found = self._lookup(missing)
        with self._lock:
            self._resolved.update(found)
            before = dict(self._members)
            old = self._members.pop(old_id, None)
            self._members[member.sandbox_id] = member
            try:
                self._apply_locked()
            except BaseException:
                self._members = before
                raise
        if old is not None:
            self._forget({old.ip, member.ip}, started_only=True)

    def release(self, sandbox_id: str) -> None:
        """Drop a sandbox's rules; nothing happens for one the firewall does not know."""
        with self._lock:
            gone = self._members.pop(sandbox_id, None)
            if gone is None:
                return
            self._apply_locked()
        # Its address goes to the next sandbox: nothing of this one's flows with it.
        self._forget({gone.ip})

    def _forget(self, ips: set[str], *, started_only: bool = False) -> None:
        conntrack.forget_flows(self.config.netns, ips, started_only=started_only)

    def refresh(self) -> bool:
        """Resolve every policy domain again; True if that changed the rules."""
        with self._lock:
            domains = sorted({d for m in self._members.values() for d in m.policy.domains})
        found = self._lookup(domains)
        with self._lock:
            live = {d for m in self._members.values() for d in m.policy.domains}
            self._resolved = {d: ips for d, ips in {**self._resolved, **found}.items() if d in live}
            before = self._applied
            self._apply_locked()
            return self._applied != before

    def _lookup(self, domains: list[str]) -> dict[str, tuple[str, ...]]:
        if not domains:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(domains))) as pool:
            results = dict(zip(domains, pool.map(self._resolve, domains), strict=True))
        for domain, ips in results.items():
            if not ips:
                log.warning("firewall: %s does not resolve; it matches nothing", domain)
        return results

    def _apply_locked(self) -> None:
        if self._held:
            return
        script = render(self.config, self._members.values(), self._resolved)
        if script != self._applied:
            self._nft.apply(script)
            self._applied = script
