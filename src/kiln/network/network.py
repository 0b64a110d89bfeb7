"""The sandbox bridge, its TAPs and its NAT rules (netlink via pyroute2).

Every netlink request runs in the :class:`~kiln.network.netns.NamespaceWorker`
thread, which sits inside the configured namespace; so do the TUN ioctl that
makes a persistent TAP and the ``ip_forward`` sysctl write, both of which act
on the namespace of the calling *thread*. iptables runs via ``ip netns exec``.

All public methods are blocking and thread-safe (they are serialized on the
worker). ``create_tap`` / ``delete_tap`` take about a millisecond; ``setup`` with
NAT takes tens of milliseconds (a few ``iptables`` runs). From async code call
them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator, Set
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .config import RESOLV_CONF_PATHS, NetworkConfig, host_nameservers
from .errors import InvalidInput, NamespaceNotFound, OperationFailed
from .iptables import Iptables, bridge_rules
from .naming import address_mac, guest_mac, tap_name, validate_ifname, validate_sandbox_id
from .netns import NamespaceWorker, ensure_netns, setns_net
from .pool import guest_address

T = TypeVar("T")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IFLA_TUN_TYPE_TAP = 2
# What QEMU asks for when it attaches (no packet-info header, virtio-net header);
# creating the TAP with the same flags means nothing changes on attach.
_TAP_FLAGS = {"no_pi": True, "vnet_hdr": True, "one_queue": False, "multi_queue": False}
_ALIAS_PREFIX = "kiln:"
#: The container's end of its veth (what every container runtime calls it).
CONTAINER_IFNAME = "eth0"


class GuestNetwork(TypedDict):
    """What a guest needs to configure eth0 (JSON-ready)."""

    address: str  # "10.213.0.5/24"
    gateway: str  # "10.213.0.1"
    dns: list[str]
    mac: str  # "02:..", the MAC QEMU gives the guest NIC


@contextmanager
def _netlink(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        code = int(exc.code)
        raise OperationFailed(f"{what}: {os.strerror(code)} (netlink errno {code})") from exc


def _kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    kind = None if info is None else info.get("IFLA_INFO_KIND")
    return None if kind is None else str(kind)


def _is_tap(link: Any) -> bool:
    if _kind(link) != "tun":
        return False
    data = link.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")
    # Kernels before 4.15 do not report the tun type: trust the kind then.
    return data is None or data.get("IFLA_TUN_TYPE") in (None, IFLA_TUN_TYPE_TAP)


class Network:
    """The sandbox network described by a :class:`NetworkConfig`.

    The constructor does no I/O; the worker thread starts on first use and
    :meth:`close` (or ``with Network(...)``) stops it. While open, the worker
    keeps the configured namespace alive.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        self._config = config if config is not None else NetworkConfig()
        self._worker = NamespaceWorker(self._config.netns, on_leave=self._close_ipr)
        self._iptables = Iptables(self._config.netns)
        self._rules = bridge_rules(self._config.bridge, self._config.subnet)
        self._dns: list[str] | None = None if self._config.dns is None else list(self._config.dns)
        self._ipr: Any = None  # worker thread only; closed whenever it leaves the namespace

    @property
    def config(self) -> NetworkConfig:
        return self._config

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker thread (idempotent). Leaves bridge, TAPs and rules in place."""
        self._worker.close(final=self._close_ipr)

    # -- bridge, forwarding, NAT -------------------------------------------------

    def setup(self) -> None:
        """Converge to the config; idempotent.

        Creates the namespace if configured and missing; the bridge with its fixed
        MAC (re-setting it if someone changed it), the gateway address (removing
        any other IPv4 address from the bridge), link up; ``ip_forward=1`` in the
        namespace; the NAT/FORWARD rules when ``nat`` is on, or removes ours when
        it is off. With ``nat`` on, a missing ``iptables`` is reported before
        anything is touched.
        """
        if self._config.nat:
            Iptables.require()
        if self._config.netns is not None:
            ensure_netns(self._config.netns)
        self._worker.run(self._setup)

    def teardown(self) -> None:
        """Delete every kiln TAP, the bridge and our iptables rules (tests, uninstall).

        Leaves ``ip_forward`` and the namespace itself alone. No error if there is
        nothing to remove or the namespace does not exist.
        """
        try:
            self._worker.run(self._teardown)
        except NamespaceNotFound:
            return

    # -- TAPs --------------------------------------------------------------------

    def tap_name(self, sandbox_id: str) -> str:
        """The TAP name of a sandbox (pure)."""
        return tap_name(self._config.tap_prefix, sandbox_id)

    def mac_for(self, sandbox_id: str) -> str:
        """The guest NIC's MAC of a sandbox (pure, locally administered)."""
        return guest_mac(sandbox_id)

    def create_tap(self, sandbox_id: str, on_bridge: bool = True) -> str:
        """A persistent TAP for the sandbox, on the bridge (unless not ``on_bridge``)
        and up; idempotent.

        Raises OperationFailed if the bridge does not exist (call :meth:`setup`
        first) or the name is taken by another device or another sandbox's TAP.
        """
        name = self.tap_name(sandbox_id)
        return self._worker.run(lambda: self._create_tap(name, sandbox_id, on_bridge))

    def set_tap_on_bridge(self, name: str, on: bool) -> None:
        """Put a kiln TAP on the bridge or take it off (a fork's clone keeps its TAP
        off until it has its own addresses); no error if it already is."""
        self._check_tap_name(name)
        self._worker.run(lambda: self._set_tap_master(name, on))

    def packet_socket(self, name: str, ethertype: int) -> socket.socket:
        """A raw datagram socket (AF_PACKET) for frames of ``ethertype`` on the TAP
        ``name``, made inside the namespace; the caller closes it."""
        self._check_tap_name(name)

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ethertype))
            try:
                sock.bind((name, ethertype))
            except OSError:
                sock.close()
                raise
            return sock

        try:
            return self._worker.run(make)
        except OSError as exc:
            raise OperationFailed(f"cannot open a packet socket on {name}: {exc}") from exc

    def delete_tap(self, name: str) -> None:
        """Delete a kiln TAP; no error if it is gone. Refuses names without our prefix."""
        self._check_tap_name(name)
        self._worker.run(lambda: self._delete_tap(name))

    def list_taps(self) -> list[str]:
        """Every TAP whose name has our prefix, sorted."""
        return self._worker.run(self._list_taps)

    def orphan_taps(self, known: Set[str]) -> list[str]:
        """Our TAPs that are not in ``known`` (sorted)."""
        return [name for name in self.list_taps() if name not in known]

    def cleanup_orphans(self, known: Set[str]) -> list[str]:
        """Delete :meth:`orphan_taps`; returns the names deleted."""

        def work() -> list[str]:
            orphans = [name for name in self._list_taps() if name not in known]
            for name in orphans:
                self._delete_tap(name)
            return orphans

        return self._worker.run(work)

    # -- veths into containers ----------------------------------------------------

    def attach_container(self, sandbox_id: str, pid: int, ip: str) -> str:
        """Give the network namespace of process ``pid`` (a container's) an ``eth0``:
        one end of a veth pair whose other end is on the bridge, with ``ip`` (a guest
        address of the subnet), the gateway as default route and the sandbox's MAC.
        Idempotent: an existing pair of this sandbox is kept. Returns the host end's name.

        The Docker engine's containers run with ``--network none`` and get their
        interface from here rather than from dockerd, whose user-defined networks
        set up an embedded DNS server (iptables runs inside the container's
        namespace) at every start: ~100 ms of each create, measured.
        """
        name = self.tap_name(sandbox_id)
        addr = guest_address(self._config.network, ip)
        mac = address_mac(str(addr))
        return self._worker.run(lambda: self._attach_container(name, sandbox_id, pid, addr, mac))

    def _attach_container(
        self, name: str, sandbox_id: str, pid: int, address: Any, mac: str
    ) -> str:
        alias = _ALIAS_PREFIX + sandbox_id
        try:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OperationFailed(f"the network namespace of process {pid}: {exc}") from exc
        try:
            with _netlink(f"create veth {name} for process {pid}"):
                ipr = self._route()
                bridge_index = int(self._bridge_link()["index"])
                link = self._get_link(name)
                if link is not None:
                    if link.get("IFLA_IFALIAS") != alias or _kind(link) != "veth":
                        raise OperationFailed(f"{name!r} exists and is not this sandbox's veth")
                    if _in_namespace(target, lambda inner: _is_peer(inner, link)):
                        return name  # made before (a re-adopted sandbox)
                    # The pair of the container's previous namespace (a restart), which
                    # the kernel has not destroyed yet: it goes, a new one comes.
                    self._delete_link(int(link["index"]))
                ipr.link(
                    "add",
                    ifname=name,
                    kind="veth",
                    peer={"ifname": CONTAINER_IFNAME, "address": mac, "net_ns_fd": target},
                )
                index = int(ipr.link_lookup(ifname=name)[0])
                ipr.link("set", index=index, master=bridge_index, ifalias=alias, state="up")
            _in_namespace(target, lambda inner: self._configure_eth0(inner, address))
        finally:
            os.close(target)
        return name

    def detach_container(self, sandbox_id: str) -> None:
        """Delete the host end of the sandbox's veth now; no error if it is gone.

        The kernel deletes the pair with the container's namespace, but only once
        it gets round to destroying that namespace (deferred work, seconds on a
        busy host): until then the name, and the bridge port, would stay taken.
        """
        name = self.tap_name(sandbox_id)
        alias = _ALIAS_PREFIX + sandbox_id

        def work() -> None:
            with _netlink(f"delete veth {name}"):
                link = self._get_link(name)
                if link is None:
                    return
                if link.get("IFLA_IFALIAS") != alias or _kind(link) != "veth":
                    raise OperationFailed(f"{name!r} is not this sandbox's veth; not deleting it")
                self._delete_link(int(link["index"]))

        self._worker.run(work)

    def cleanup_orphan_veths(self, known: Set[str]) -> list[str]:
        """Delete the container veths on this bridge of sandboxes not in ``known`` (ids);
        returns their names."""

        def work() -> list[str]:
            with _netlink("list links"):
                links = self._route().get_links()
                bridge_index = int(self._bridge_link()["index"])
            removed = []
            for link in links:
                alias = str(link.get("IFLA_IFALIAS") or "")
                if _kind(link) != "veth" or not alias.startswith(_ALIAS_PREFIX):
                    continue
                if link.get("IFLA_MASTER") != bridge_index:
                    continue  # on another bridge: another daemon's
                if alias.removeprefix(_ALIAS_PREFIX) in known:
                    continue
                with _netlink(f"delete veth {link.get('IFLA_IFNAME')}"):
                    self._delete_link(int(link["index"]))
                removed.append(str(link.get("IFLA_IFNAME")))
            return removed

        return self._worker.run(work)

    def _delete_link(self, index: int) -> None:
        try:
            self._route().link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise

    def _configure_eth0(self, ipr: Any, address: Any) -> None:
        cfg = self._config
        with _netlink(f"configure {CONTAINER_IFNAME} in a container"):
            index = int(ipr.link_lookup(ifname=CONTAINER_IFNAME)[0])
            ipr.addr("add", index=index, address=str(address), prefixlen=cfg.prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(cfg.gateway), oif=index)

    # -- guest configuration -------------------------------------------------------

    def dns_servers(self) -> list[str]:
        """Resolvers for guests: the config's, else the host's (read once)."""
        if self._dns is None:
            paths = list(RESOLV_CONF_PATHS)
            if self._config.netns is not None:  # what `ip netns exec` would show
                paths.insert(0, Path("/etc/netns") / self._config.netns / "resolv.conf")
            self._dns = host_nameservers(paths)
        return list(self._dns)

    def guest_network(self, ip: str, sandbox_id: str) -> GuestNetwork:
        """eth0 settings for the sandbox that holds ``ip`` (a guest address of the subnet)."""
        addr = guest_address(self._config.network, ip)
        return GuestNetwork(
            address=f"{addr}/{self._config.prefixlen}",
            gateway=str(self._config.gateway),
            dns=self.dns_servers(),
            mac=self.mac_for(validate_sandbox_id(sandbox_id)),
        )

    # -- worker-thread side ----------------------------------------------------------

    def _check_tap_name(self, name: str) -> None:
        validate_ifname(name, "TAP name")
        if not name.startswith(self._config.tap_prefix):
            raise InvalidInput(
                f"{name!r} is not a kiln TAP (prefix {self._config.tap_prefix!r}); "
                "refusing to touch it"
            )

    def _route(self) -> Any:
        """The worker's IPRoute (a netlink socket in the namespace the worker is in)."""
        if self._ipr is None:
            with _netlink("open a netlink socket"):
                self._ipr = IPRoute()
        return self._ipr

    def _close_ipr(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            ipr.close()

    def _get_link(self, name: str) -> Any:
        """The link message of ``name``, or None."""
        try:
            return self._route().link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise

    def _bridge_link(self) -> Any:
        bridge = self._config.bridge
        link = self._get_link(bridge)
        if link is None:
            raise OperationFailed(f"bridge {bridge!r} does not exist; call Network.setup() first")
        if _kind(link) != "bridge":
            raise OperationFailed(
                f"{bridge!r} exists but is a {_kind(link) or 'plain'} device, not a bridge; "
                "kiln will not touch it (choose another bridge name)"
            )
        return link

    def _setup(self) -> None:
        cfg = self._config
        mac = cfg.effective_bridge_mac
        with _netlink(f"set up bridge {cfg.bridge}"):
            ipr = self._route()
            if self._get_link(cfg.bridge) is None:
                try:
                    ipr.link(
                        "add", ifname=cfg.bridge, kind="bridge", address=mac, br_forward_delay=0
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:  # lost a race: converge on it below
                        raise
            bridge = self._bridge_link()
            index = int(bridge["index"])
            if bridge.get("IFLA_ADDRESS") != mac:
                ipr.link("set", index=index, address=mac)
            want = (str(cfg.gateway), cfg.prefixlen)
            have = {
                (str(a.get("IFA_ADDRESS")), int(a["prefixlen"]))
                for a in ipr.get_addr(index=index, family=socket.AF_INET)
            }
            for address, prefixlen in sorted(have - {want}):
                ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            if want not in have:
                ipr.addr("add", index=index, address=want[0], prefixlen=want[1])
            ipr.link("set", index=index, state="up")
        self._enable_forwarding()
        if cfg.nat:
            for rule in self._rules:
                self._iptables.ensure(rule)
        elif Iptables.available():
            for rule in self._rules:
                self._iptables.remove(rule)

    def _enable_forwarding(self) -> None:
        # /proc/sys/net is resolved against the opening *thread's* namespace.
        try:
            if IP_FORWARD.read_text().strip() != "1":
                IP_FORWARD.write_text("1\n")
        except OSError as exc:
            raise OperationFailed(f"cannot enable net.ipv4.ip_forward: {exc}") from exc

    def _teardown(self) -> None:
        cfg = self._config
        with _netlink(f"tear down bridge {cfg.bridge}"):
            for name in self._list_taps():
                self._delete_tap(name)
            link = self._get_link(cfg.bridge)
            if link is not None and _kind(link) == "bridge":
                try:
                    self._route().link("del", index=int(link["index"]))
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise
        if Iptables.available():
            for rule in self._rules:
                self._iptables.remove(rule)

    def _create_tap(self, name: str, sandbox_id: str, on_bridge: bool) -> str:
        alias = _ALIAS_PREFIX + sandbox_id
        with _netlink(f"create TAP {name}"):
            ipr = self._route()
            bridge_index = int(self._bridge_link()["index"])
            link = self._get_link(name)
            if link is None:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=_TAP_FLAGS)
                link = self._get_link(name)
                if link is None:
                    raise OperationFailed(f"TAP {name} vanished right after it was created")
            elif not _is_tap(link):
                raise OperationFailed(f"{name!r} exists and is not a TAP device; not touching it")
            else:
                current = link.get("IFLA_IFALIAS")
                if current and current != alias:
                    raise OperationFailed(
                        f"TAP {name} already belongs to {current[len(_ALIAS_PREFIX) :]!r} "
                        f"(hash collision with sandbox {sandbox_id!r})"
                    )
            master = bridge_index if on_bridge else 0
            ipr.link("set", index=int(link["index"]), master=master, ifalias=alias, state="up")
        return name

    def _set_tap_master(self, name: str, on: bool) -> None:
        with _netlink(f"{'attach' if on else 'detach'} TAP {name}"):
            link = self._get_link(name)
            if link is None or not _is_tap(link):
                raise OperationFailed(f"{name!r} is not a TAP device")
            master = int(self._bridge_link()["index"]) if on else 0
            self._route().link("set", index=int(link["index"]), master=master)

    def _delete_tap(self, name: str) -> None:
        with _netlink(f"delete TAP {name}"):
            link = self._get_link(name)
            if link is None:
                return
            if not _is_tap(link):
                raise OperationFailed(f"{name!r} is not a TAP device; not deleting it")
            try:
                self._route().link("del", index=int(link["index"]))
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise

    def _list_taps(self) -> list[str]:
        prefix = self._config.tap_prefix
        with _netlink("list links"):
            links = self._route().get_links()
        return sorted(
            str(link.get("IFLA_IFNAME"))
            for link in links
            if str(link.get("IFLA_IFNAME")).startswith(prefix) and _is_tap(link)
        )


def _is_peer(ipr: Any, host_end: Any) -> bool:
    """Whether ``ipr``'s namespace holds the other end of the veth ``host_end``."""
    found = ipr.link_lookup(ifname=CONTAINER_IFNAME)
    if not found:
        return False
    eth0 = ipr.link("get", index=found[0])[0]
    return bool(
        eth0.get("IFLA_LINK") == host_end["index"] and host_end.get("IFLA_LINK") == eth0["index"]
    )


def _in_namespace(fd: int, work: Callable[[Any], T]) -> T:
    """Run ``work`` with a netlink socket inside the namespace ``fd`` (the calling
    thread goes in only to open the socket, which stays there for life)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            setns_net(fd)
            ipr = IPRoute()
        finally:
            setns_net(home)
    finally:
        os.close(home)
    try:
        return work(ipr)
    finally:
        ipr.close()
