"""How one node proves to another that a request comes from it.

A relayed request keeps the caller's own credentials (API keys live in the shared
store, so the owning node checks them itself); the relaying node adds
:data:`PEER_HEADER`: ``<node>:<unix time>:<hex HMAC-SHA256>`` over the node's
name, the time, the method and the path (with its query), keyed by the cluster
secret every node shares. It tells the receiver that a peer already routed this
request, so the receiver serves it or refuses it and never relays it again (no
loops), and it authenticates the node-to-node calls that have no caller (a
create placed on another node carries the caller's key; internal calls carry
only this). A signature older or newer than :data:`MAX_SKEW_S` is refused (the
nodes' clocks must roughly agree; they share a database already).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .errors import PeerAuthError

PEER_HEADER: Final = "x-kiln-peer"
MAX_SKEW_S: Final = 60.0
SECRET_BYTES: Final = 32


@dataclass(frozen=True, slots=True)
class PeerAuth:
    """This node's name and the cluster secret."""

    node: str
    secret: bytes

    @classmethod
    def load(cls, node: str, path: Path, *, create: bool = True) -> PeerAuth:
        """The secret from ``path`` (made, mode 0600, if missing and ``create``).
        Raises :class:`~.errors.ClusterError` for an unreadable or too short file."""
        try:
            raw = path.read_bytes().strip()
        except FileNotFoundError:
            if not create:
                raise PeerAuthError(f"cluster secret {path} does not exist") from None
            raw = secrets.token_hex(SECRET_BYTES).encode()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb", opener=_open_private) as out:
                out.write(raw + b"\n")
        except OSError as exc:
            raise PeerAuthError(f"cannot read cluster secret {path}: {exc.strerror}") from None
        if len(raw) < SECRET_BYTES:
            raise PeerAuthError(f"cluster secret {path} is too short (at least 32 bytes)")
        return cls(node, raw)

    @property
    def fingerprint(self) -> str:
        """Names the secret without giving it away (what the store records, so a node
        with another secret is noticed at start)."""
        return hashlib.sha256(b"kiln cluster secret\0" + self.secret).hexdigest()[:32]

    def sign(self, method: str, target: str, *, now: float | None = None) -> str:
        """The :data:`PEER_HEADER` value for a request ``method target`` (path?query)."""
        stamp = f"{now if now is not None else time.time():.3f}"
        return f"{self.node}:{stamp}:{self._mac(self.node, stamp, method, target)}"

    def verify(self, value: str, method: str, target: str, *, now: float | None = None) -> str:
        """The sending node's name, if ``value`` signs ``method target``; else
        :class:`~.errors.PeerAuthError`."""
        node, sep, rest = value.partition(":")
        stamp, sep2, mac = rest.partition(":")
        if not (node and sep and sep2 and stamp and mac):
            raise PeerAuthError("malformed peer signature")
        try:
            when = float(stamp)
        except ValueError:
            raise PeerAuthError("malformed peer signature") from None
        current = now if now is not None else time.time()
        if abs(current - when) > MAX_SKEW_S:
            raise PeerAuthError(f"peer signature from {node!r} is {current - when:.0f} s off")
        if not hmac.compare_digest(mac, self._mac(node, stamp, method, target)):
            raise PeerAuthError(f"bad peer signature from {node!r}")
        return node

    def _mac(self, node: str, stamp: str, method: str, target: str) -> str:
        message = f"{node}\n{stamp}\n{method.upper()}\n{target}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
