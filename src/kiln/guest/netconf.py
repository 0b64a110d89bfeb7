"""eth0's static configuration with the classic socket ioctls (stdlib only).

Spawning ``ip`` for this cost a fork and a cold exec at every boot and, worse,
at every sandbox restored from a template, where nothing is translated yet
under TCG. Four ioctls on a datagram socket do the same: MAC, address with
netmask and broadcast, link up, default route. IPv4 only, like
:class:`~kiln.guest.config.NetworkSpec`: IPv6 is switched off on the interface
(loopback keeps ``::1``), see :func:`disable_ipv6`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import socket
import struct

from .config import NetworkSpec

SIOCADDRT = 0x890B
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFBRDADDR = 0x891A
SIOCSIFNETMASK = 0x891C
SIOCSIFHWADDR = 0x8924
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2
ARPHRD_ETHER = 1
_IFNAMSIZ = 16
_IFREQ_UNION = 24  # sizeof(struct ifreq) is 40 on 64-bit Linux


class _RtEntry(ctypes.Structure):
    """``struct rtentry`` (linux/route.h); ctypes gets the padding right."""

    _fields_ = [
        ("rt_pad1", ctypes.c_ulong),
        ("rt_dst", ctypes.c_ubyte * 16),
        ("rt_gateway", ctypes.c_ubyte * 16),
        ("rt_genmask", ctypes.c_ubyte * 16),
        ("rt_flags", ctypes.c_ushort),
        ("rt_pad2", ctypes.c_short),
        ("rt_pad3", ctypes.c_ulong),
        ("rt_pad4", ctypes.c_void_p),
        ("rt_metric", ctypes.c_short),
        ("rt_dev", ctypes.c_char_p),
        ("rt_mtu", ctypes.c_ulong),
        ("rt_window", ctypes.c_ulong),
        ("rt_irtt", ctypes.c_ushort),
    ]


def sockaddr_in(address: str) -> bytes:
    """A 16-byte ``struct sockaddr_in`` with port 0."""
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(address))


def ifreq(name: str, payload: bytes = b"") -> bytes:
    encoded = name.encode()
    if not encoded or len(encoded) >= _IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    return struct.pack(f"{_IFNAMSIZ}s{_IFREQ_UNION}s", encoded, payload)


def hwaddr(mac: str) -> bytes:
    """The ``ifr_hwaddr`` sockaddr of an Ethernet MAC ``aa:bb:cc:dd:ee:ff``."""
    return struct.pack("=H6s8x", ARPHRD_ETHER, bytes.fromhex(mac.replace(":", "")))


def default_route(gateway: str) -> bytes:
    sockaddr = ctypes.c_ubyte * 16
    entry = _RtEntry()
    entry.rt_dst = sockaddr.from_buffer_copy(sockaddr_in("0.0.0.0"))
    entry.rt_genmask = sockaddr.from_buffer_copy(sockaddr_in("0.0.0.0"))
    entry.rt_gateway = sockaddr.from_buffer_copy(sockaddr_in(gateway))
    entry.rt_flags = RTF_UP | RTF_GATEWAY
    return bytes(entry)


def disable_ipv6(dev: str, proc_sys: str = "/proc/sys/net/ipv6/conf") -> None:
    """Switch IPv6 off on ``dev``, best effort: left on it costs time, not function,
    so a kernel without IPv6 or a read-only ``/proc/sys`` must not stop the network.

    The sandbox network is IPv4 only, so on ``dev`` IPv6 only sends router
    solicitations and neighbour discovery that nobody answers -- at every link
    up and again after every restore (the NIC announces itself). Under TCG that
    is guest CPU spent exactly when a woken sandbox should answer its caller:
    measured, ~900 of the ~3,700 blocks translated in the 300 ms after a restore.
    """
    with contextlib.suppress(OSError), open(f"{proc_sys}/{dev}/disable_ipv6", "w") as f:
        f.write("1")


def configure(network: NetworkSpec) -> None:
    """IPv6 off, MAC, address/prefix, up, default route. Raises OSError naming the
    failed step (IPv6 off is best effort)."""
    disable_ipv6(network.interface)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _configure(network, s)


def reconfigure(network: NetworkSpec, sock: socket.socket) -> None:
    """A running interface takes another MAC and address (a fork's clone): what
    :func:`configure` does but IPv6 off (done at boot), on ``sock``, an AF_INET
    datagram socket opened earlier -- creating one first thing after a restore
    costs ~10 ms under TCG."""
    _configure(network, sock)


def _configure(network: NetworkSpec, s: socket.socket) -> None:
    dev = network.interface
    iface = ipaddress.IPv4Interface(network.address)
    steps: list[tuple[str, int, bytes]] = []
    if network.mac:
        steps.append(("set the MAC", SIOCSIFHWADDR, ifreq(dev, hwaddr(network.mac))))
    steps += [
        ("set the address", SIOCSIFADDR, ifreq(dev, sockaddr_in(str(iface.ip)))),
        ("set the netmask", SIOCSIFNETMASK, ifreq(dev, sockaddr_in(str(iface.netmask)))),
        (
            "set the broadcast address",
            SIOCSIFBRDADDR,
            ifreq(dev, sockaddr_in(str(iface.network.broadcast_address))),
        ),
    ]
    for what, request, arg in steps:
        _ioctl(s, request, arg, f"{dev}: {what}")
    flags = struct.unpack_from("=H", _ioctl(s, SIOCGIFFLAGS, ifreq(dev), dev), _IFNAMSIZ)[0]
    up = struct.pack("=H", flags | IFF_UP)
    _ioctl(s, SIOCSIFFLAGS, ifreq(dev, up), f"{dev}: bring it up")
    if network.gateway:
        try:
            fcntl.ioctl(s, SIOCADDRT, default_route(network.gateway))
        except OSError as exc:
            if exc.errno != errno.EEXIST:  # configured already: what we wanted
                raise OSError(exc.errno, f"default route via {network.gateway}: {exc}") from exc


def _ioctl(sock: socket.socket, request: int, arg: bytes, what: str) -> bytes:
    try:
        result: bytes = fcntl.ioctl(sock, request, arg)
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: {exc.strerror}") from exc
    return result
