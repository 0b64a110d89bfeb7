"""Deterministic names and MAC addresses, and the validators for user-supplied names.

Pure functions, no I/O. Everything derived from a sandbox id is stable across
daemon restarts, so a recovered daemon finds the TAP it made before and a guest
restored from a snapshot keeps talking to the same MACs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from .errors import InvalidInput

IFNAMSIZ = 16  # the kernel's limit including the trailing NUL
MAX_IFNAME = IFNAMSIZ - 1
TAP_HASH_CHARS = 8
MAX_TAP_PREFIX = MAX_IFNAME - TAP_HASH_CHARS
MAX_SANDBOX_ID = 128

# Stricter than the kernel (which only forbids "/", ":", whitespace, "." and ".."),
# so a name is always safe on a command line and in /run/netns.
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TAP_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_NETNS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def validate_ifname(name: object, what: str = "interface name") -> str:
    """Return ``name`` if it is a usable Linux interface name, else raise InvalidInput."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_IFNAME:
        raise InvalidInput(f"{what} {name!r} is longer than {MAX_IFNAME} characters")
    if not _IFNAME_RE.fullmatch(name):
        raise InvalidInput(
            f"{what} {name!r} may only contain letters, digits, '_', '.', '-' "
            "and must start with a letter or digit"
        )
    return name


def validate_tap_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise InvalidInput(f"TAP prefix must be a non-empty string, got {prefix!r}")
    if len(prefix) > MAX_TAP_PREFIX:
        raise InvalidInput(
            f"TAP prefix {prefix!r} is longer than {MAX_TAP_PREFIX} characters "
            f"(prefix + {TAP_HASH_CHARS} hex characters must fit in {MAX_IFNAME})"
        )
    if not _TAP_PREFIX_RE.fullmatch(prefix):
        raise InvalidInput(
            f"TAP prefix {prefix!r} must start with a letter and contain only "
            "letters, digits, '_' and '-'"
        )
    return prefix


def validate_netns(name: object) -> str:
    """Return ``name`` if it is a usable ``ip netns`` name, else raise InvalidInput."""
    if not isinstance(name, str) or not _NETNS_RE.fullmatch(name):
        raise InvalidInput(
            f"network namespace name {name!r} must be 1-64 characters of letters, "
            "digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


def validate_sandbox_id(sandbox_id: object) -> str:
    if not isinstance(sandbox_id, str) or not sandbox_id:
        raise InvalidInput(f"sandbox id must be a non-empty string, got {sandbox_id!r}")
    if len(sandbox_id) > MAX_SANDBOX_ID or not sandbox_id.isprintable():
        raise InvalidInput(
            f"sandbox id {sandbox_id[:40]!r} must be printable and at most "
            f"{MAX_SANDBOX_ID} characters"
        )
    return sandbox_id


def normalize_mac(mac: object, what: str = "MAC address") -> str:
    """Canonical lower-case ``aa:bb:cc:dd:ee:ff``; must be a unicast, non-zero MAC."""
    if not isinstance(mac, str):
        raise InvalidInput(f"{what} must be a string, got {mac!r}")
    canonical = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(canonical):
        raise InvalidInput(f"{what} {mac!r} is not of the form aa:bb:cc:dd:ee:ff")
    first = int(canonical[:2], 16)
    if first & 0x01:
        raise InvalidInput(f"{what} {mac!r} is a multicast address")
    if canonical == "00:00:00:00:00:00":
        raise InvalidInput(f"{what} must not be all zeros")
    return canonical


def _digest(domain: str, key: str) -> bytes:
    return hashlib.sha256(f"kiln/{domain}/{key}".encode()).digest()


def _local_mac(digest: bytes) -> str:
    # Set the locally-administered bit, clear the multicast bit: such a MAC can
    # never collide with a vendor-assigned one.
    octets = bytearray(digest[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def tap_name(prefix: str, sandbox_id: str) -> str:
    """``prefix`` + 8 hex characters of a hash of the sandbox id (≤ 15 characters).

    32 bits of hash: a collision is unlikely below tens of thousands of live
    sandboxes, and :meth:`Network.create_tap` detects it (the TAP's alias records
    the sandbox id) instead of sharing a TAP between two sandboxes.
    """
    validate_tap_prefix(prefix)
    validate_sandbox_id(sandbox_id)
    return prefix + _digest("tap", sandbox_id).hex()[:TAP_HASH_CHARS]


def guest_mac(sandbox_id: str) -> str:
    """A deterministic, locally administered unicast MAC for a sandbox's NIC."""
    return _local_mac(_digest("guest-mac", validate_sandbox_id(sandbox_id)))


def address_mac(address: str) -> str:
    """A locally administered MAC made of an IPv4 address (``02:42:`` + its bytes, as
    dockerd's), for a NIC whose address outlives it: a new container on an address
    an earlier one had gets the same MAC, so the neighbour entries the bridge's side
    still holds (for up to a minute) stay right."""
    packed = ipaddress.IPv4Address(address).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in packed)


def bridge_mac(bridge: str) -> str:
    """A deterministic, locally administered unicast MAC for a bridge.

    The bridge keeps it across re-creation, so a guest restored from a snapshot
    (whose ARP cache still holds the gateway's MAC) keeps reaching its gateway.
    """
    return _local_mac(_digest("bridge-mac", validate_ifname(bridge, "bridge name")))
