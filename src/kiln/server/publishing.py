"""Published ports: a sandbox port served without auth at ``<alias>.<publish domain>``.

A publish rule (in the store) maps a globally unique alias to a sandbox and a
port. Requests whose ``Host`` is ``<alias>.<publish domain>`` reach the daemon's
own listener and are relayed by :mod:`kiln.server.proxy`; this module owns the
rules, the aliases and the URLs.

URLs are built from how the client reached the daemon (:class:`Origin`): a
daemon on ``127.0.0.1:8080`` with the default domain ``localhost`` publishes
``http://<alias>.localhost:8080/``, which browsers resolve to the host itself.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers

from kiln.api.requests import ALIAS_RE, PublishPort
from kiln.store import NameTaken, PublishRule, User, rfc3339

if TYPE_CHECKING:
    from .services import Services

_NOT_ALIAS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True, slots=True)
class Origin:
    """Scheme and port a client used to reach the daemon (None: the scheme's default)."""

    scheme: str = "http"
    port: int | None = None

    @classmethod
    def of(cls, scheme: str, headers: Headers) -> Origin:
        _, port = split_host(headers.get("host", ""))
        if port == {"http": 80, "https": 443}.get(scheme):
            port = None
        return cls(scheme, port)

    def url(self, host: str, path: str = "/") -> str:
        netloc = host if self.port is None else f"{host}:{self.port}"
        return f"{self.scheme}://{netloc}{path}"


def split_host(value: str) -> tuple[str, int | None]:
    """``Host`` header → (lowercase host name, port or None)."""
    host, port = value.strip().lower(), None
    if host.startswith("["):  # an IPv6 literal
        end = host.find("]")
        rest = host[end + 1 :] if end >= 0 else ""
        host = host[: end + 1] if end >= 0 else host
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        return host, port
    name, sep, tail = host.rpartition(":")
    if sep and tail.isdigit():
        host, port = name, int(tail)
    return host.rstrip("."), port


def default_alias(sandbox_name: str, port: int) -> str:
    """``<sandbox name as a DNS label>-<port>``, e.g. ``my-app-3000``."""
    stem = _NOT_ALIAS.sub("-", sandbox_name.lower()).strip("-")[:50].rstrip("-")
    return f"{stem}-{port}" if stem else f"port-{port}"


class PublishService:
    def __init__(self, services: Services) -> None:
        self._s = services

    @property
    def domain(self) -> str:
        return self._s.config.publish_domain.lower().rstrip(".")

    def alias_of(self, host_header: str) -> str | None:
        """The alias a ``Host`` header addresses, or None when it is not
        ``<one DNS label>.<publish domain>`` (the API's own host names)."""
        host, _ = split_host(host_header)
        label, dot, domain = host.partition(".")
        if not dot or domain != self.domain or not ALIAS_RE.match(label):
            return None
        return label

    def url(self, alias: str, origin: Origin) -> str:
        return origin.url(f"{alias}.{self.domain}")

    def view(self, rule: PublishRule, origin: Origin) -> dict[str, Any]:
        return {
            "id": rule.id,
            "sandbox_id": rule.sandbox_id,
            "port": rule.port,
            "alias": rule.alias,
            "url": self.url(rule.alias, origin),
            "created_at": rfc3339(rule.created_at),
        }

    def publish(self, user: User, ref: str, body: PublishPort, origin: Origin) -> dict[str, Any]:
        """Publish a port (409 if it is already published or the alias is taken).

        Neither wakes the sandbox nor needs anything to listen yet: a dev server
        may be published before it starts.
        """
        sb = self._s.sandboxes.find(user, ref)
        store = self._s.store
        if body.alias is not None:
            rule = store.add_publish_rule(sb.id, body.port, body.alias)
        else:
            alias = default_alias(sb.name, body.port)
            try:
                rule = store.add_publish_rule(sb.id, body.port, alias)
            except NameTaken as exc:
                if "alias" not in str(exc):
                    raise
                # Another sandbox (maybe another user's) has the natural alias.
                alias = f"{alias[:56]}-{secrets.token_hex(3)}"
                rule = store.add_publish_rule(sb.id, body.port, alias)
        return self.view(rule, origin)

    def list_for(self, user: User, ref: str, origin: Origin) -> list[dict[str, Any]]:
        sb = self._s.sandboxes.find(user, ref)
        return [self.view(r, origin) for r in self._s.store.list_publish_rules(sb.id)]

    def unpublish(self, user: User, ref: str, port: int) -> None:
        sb = self._s.sandboxes.find(user, ref)
        self._s.store.delete_publish_rule(sb.id, port)

    def urls(self, sandbox_id: str, origin: Origin) -> dict[int, str]:
        """Port → published URL, for the ports listings."""
        return {
            r.port: self.url(r.alias, origin) for r in self._s.store.list_publish_rules(sandbox_id)
        }
