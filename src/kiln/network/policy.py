"""A sandbox's egress policy: where it may open connections outside kiln.

    NetworkPolicy(egress="allow"|"deny", allow=(...), deny=(...))

``allow`` and ``deny`` hold IPv4 CIDRs (``"203.0.113.0/24"``, a bare address is a
/32) or domain names (``"pypi.org"``). The first match decides, in this order:
``allow``, ``deny``, then ``egress``. So ``{"egress": "deny", "allow": ["pypi.org"]}``
reaches PyPI and nothing else, and ``{"deny": ["10.0.0.0/8"]}`` reaches everything
but that range. Domain names are resolved by the daemon (:mod:`kiln.network.firewall`).

What no policy can open is not here: the host itself, link-local addresses, other
users' sandboxes and agent ports are closed by the firewall whatever the policy says.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

EGRESS = ("allow", "deny")
MAX_ENTRIES = 256
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
# At least two labels and an alphabetic top-level label: "10.0.0" is a typo, not a name.
_DOMAIN_RE = re.compile(rf"^(?:{_LABEL}\.)+[a-z][a-z0-9-]{{0,62}}(?<!-)\.?$")


def parse_target(raw: object) -> str:
    """A normalized allow/deny entry: ``"a.b.c.d/n"`` for an IPv4 address or network,
    a lower-case domain name without the trailing dot, or InvalidInput saying why."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInput(f"{raw!r} is neither an IPv4 CIDR nor a domain name")
    text = raw.strip().lower()
    if "://" in text:
        host = text.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
        raise InvalidInput(f"{raw!r} is a URL; give the domain name alone ({host!r})")
    if text[0].isdigit() and not _DOMAIN_RE.match(text):
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise InvalidInput(f"{raw!r} is not a valid IPv4 CIDR: {exc}") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise InvalidInput(f"{raw!r} is IPv6; sandboxes have IPv4 only")
        return str(net)
    if ":" in text:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise InvalidInput(f"{raw!r} is neither an IPv4 CIDR nor a domain name") from None
        raise InvalidInput(f"{raw!r} is IPv6; sandboxes have IPv4 only")
    if len(text) > 253 or not _DOMAIN_RE.match(text):
        raise InvalidInput(f"{raw!r} is neither an IPv4 CIDR nor a domain name")
    return text.rstrip(".")


def is_domain(target: str) -> bool:
    """True for a domain entry of a parsed policy (CIDRs contain a '/')."""
    return "/" not in target


def _targets(raw: object, field: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str) or not isinstance(raw, Iterable):
        raise InvalidInput(f"{field} must be a list of CIDRs or domain names, got {raw!r}")
    items = list(raw)
    if len(items) > MAX_ENTRIES:
        raise InvalidInput(f"{field} has {len(items)} entries; at most {MAX_ENTRIES}")
    parsed: list[str] = []
    for item in items:
        try:
            target = parse_target(item)
        except InvalidInput as exc:
            raise InvalidInput(f"{field}: {exc}") from None
        if target not in parsed:
            parsed.append(target)
    return tuple(parsed)


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    egress: str = "allow"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.egress not in EGRESS:
            raise InvalidInput(f"egress must be 'allow' or 'deny', got {self.egress!r}")
        object.__setattr__(self, "allow", _targets(self.allow, "allow"))
        object.__setattr__(self, "deny", _targets(self.deny, "deny"))

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(t for t in (*self.allow, *self.deny) if is_domain(t))

    @property
    def needs_dns(self) -> bool:
        """Whether the sandbox may reach anything outside (else its DNS is closed)."""
        return self.egress == "allow" or bool(self.allow)

    def to_json(self) -> dict[str, Any]:
        return {"egress": self.egress, "allow": list(self.allow), "deny": list(self.deny)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> NetworkPolicy:
        """From a JSON object; unknown keys are refused (a typo must not open a hole)."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise InvalidInput(f"a network policy is an object, got {data!r}")
        unknown = sorted(set(data) - {"egress", "allow", "deny"})
        if unknown:
            raise InvalidInput(f"unknown network policy field {unknown[0]!r}")
        return cls(
            egress="allow" if data.get("egress") is None else data["egress"],
            allow=data.get("allow") or (),
            deny=data.get("deny") or (),
        )
