"""Where a proxied request goes, and the header rules both relays (HTTP, WebSocket) share.

A relayed request keeps its method, path, query, body and end-to-end headers.
Hop-by-hop headers (RFC 9110 §7.6.1, plus any the ``Connection`` header names)
belong to one connection and are dropped both ways; the daemon's own API key
(and a node's peer signature) is never passed into the sandbox;
``X-Forwarded-*`` tell the service how it was reached, and
``X-Forwarded-Prefix`` under which path (apps that read it build correct
links; for the others, ``Location`` is rewritten on the way back).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

from starlette.types import Scope

from kiln.cluster import PEER_HEADER

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Host names by which a service in the sandbox refers to itself in ``Location``.
_SELF_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "::1"})

#: Headers no ``Connection`` token may remove (HTTP/1.1 needs them end to end).
_ESSENTIAL = frozenset({"host", "content-length", "content-type"})
#: Answers that have no body whatever their Content-Length says.
_BODYLESS = frozenset({204, 304})

Headers = list[tuple[bytes, bytes]]

_PEER = PEER_HEADER.encode()


@dataclass(frozen=True, slots=True)
class Target:
    """One relayed request: its sandbox, port, and how it was addressed."""

    sandbox_id: str
    label: str  # "sandbox <name>", for messages
    port: int
    path: bytes  # raw (still percent-encoded) path inside the sandbox, from "/"
    query: bytes
    prefix: str  # "/sandboxes/<ref>/proxy/<port>", or "" for a published port
    #: Daemon API keys the request carried (its own, or any on a published host):
    #: never passed into the sandbox.
    api_keys: frozenset[str] = frozenset()

    @property
    def target(self) -> bytes:
        """The request target sent to the service (path and query)."""
        return self.path + (b"?" + self.query if self.query else b"")


def connection_tokens(headers: Headers) -> set[str]:
    """Header names the ``Connection`` header declares hop-by-hop."""
    names: set[str] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            names.update(t.strip().lower() for t in value.decode("latin-1").split(",") if t)
    return names


def end_to_end(headers: Headers) -> Headers:
    """``headers`` without the hop-by-hop ones (``Connection`` cannot take the
    headers a message cannot do without)."""
    drop = HOP_BY_HOP | (connection_tokens(headers) - _ESSENTIAL)
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in drop]


def client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def forwarded_request_headers(scope: Scope, target: Target, *, websocket: bool = False) -> Headers:
    """The headers the service receives.

    ``Host`` stays what the client sent (dev servers such as Vite and Django
    accept ``localhost``, ``*.localhost`` and IP addresses by default);
    ``X-Forwarded-For`` gains the client's address.
    """
    incoming: Headers = list(scope["headers"])
    out: Headers = []
    xff: list[bytes] = []
    for key, value in end_to_end(incoming):
        name = key.lower()
        if name == b"x-forwarded-for":
            xff.append(value)
            continue
        if name in (b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix"):
            continue  # ours replace whatever the client claimed
        if name == b"expect":
            continue  # "100-continue" was the daemon's to answer, and it has
        if name == _PEER:
            continue  # a node's signature for the daemon it relayed to, not for the app
        if name == b"authorization" and _carries(value, target.api_keys):
            continue
        if websocket and name.startswith(b"sec-websocket-"):
            continue  # the relay's own handshake with the service sets these
        out.append((name, value))
    host = header(incoming, b"host")
    if host is None:
        host = f"127.0.0.1:{target.port}".encode()
        out.append((b"host", host))
    peer = client_host(scope)
    if peer is not None:
        xff.append(peer.encode())
    if xff:
        out.append((b"x-forwarded-for", b", ".join(xff)))
    scheme = str(scope.get("scheme", "http"))
    if websocket:
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    out.append((b"x-forwarded-proto", scheme.encode()))
    out.append((b"x-forwarded-host", host))
    if target.prefix:
        out.append((b"x-forwarded-prefix", target.prefix.encode()))
    if not websocket:
        # The body is relayed as it arrives: with its length when the client gave
        # one, chunked otherwise (h11 needs one or the other to send a body).
        chunked = (header(incoming, b"transfer-encoding") or b"").lower().endswith(b"chunked")
        if chunked and header(out, b"content-length") is None:
            out.append((b"transfer-encoding", b"chunked"))
    return out


def _carries(authorization: bytes, api_keys: frozenset[str]) -> bool:
    """Whether an ``Authorization`` value holds a daemon key (kept from the service)."""
    token = authorization.decode("latin-1").strip().partition(" ")[2].strip()
    return token in api_keys


def query_token(query: bytes) -> str | None:
    """The value of ``token=`` in a query string (a WebSocket's way to send its key)."""
    for segment in query.split(b"&"):
        name, _, value = segment.partition(b"=")
        if name == b"token":
            return unquote_to_bytes(value).decode("latin-1")
    return None


def strip_query_token(query: bytes, api_keys: frozenset[str]) -> bytes:
    """The query without ``token=<a daemon key>``, the rest byte for byte as sent."""
    if not api_keys or b"token=" not in query:
        return query
    kept = []
    for segment in query.split(b"&"):
        name, _, value = segment.partition(b"=")
        if name == b"token" and unquote_to_bytes(value).decode("latin-1") in api_keys:
            continue
        kept.append(segment)
    return b"&".join(kept)


def rewrite_location(value: str, target: Target, scheme: str, host: str) -> str:
    """A ``Location`` the service sent, as the client must follow it.

    ``/login`` becomes ``<prefix>/login``; an absolute URL back to the service
    itself (``http://localhost:3000/x``) becomes the same path on the host the
    client used. Relative and foreign URLs are left alone, and so is a path
    that already carries the prefix (an app that honours ``X-Forwarded-Prefix``).
    """
    parts = urlsplit(value)
    if not parts.scheme and not parts.netloc:
        if not value.startswith("/") or not target.prefix:
            return value
        if value == target.prefix or value.startswith(target.prefix + "/"):
            return value
        return target.prefix + value
    default_port = {"http": 80, "https": 443}.get(parts.scheme or scheme)
    try:
        port = parts.port or default_port
    except ValueError:
        return value
    # Back to the service itself, or to the Host it was sent (Rails, FastAPI's
    # slash redirects): both mean "this app", which lives under the prefix.
    itself = (parts.hostname or "") in _SELF_HOSTS and port == target.port
    if not itself and parts.netloc.lower() != host.lower():
        return value
    path = parts.path or "/"
    if target.prefix and not (path == target.prefix or path.startswith(target.prefix + "/")):
        path = target.prefix + path
    return urlunsplit((scheme, host, path, parts.query, parts.fragment))


def rewrite_cookie(value: str, target: Target) -> str:
    """A ``Set-Cookie`` confined to where the app is served: without ``Domain`` (a
    cookie for the whole publish domain would reach every other published app,
    other users' too), and under the proxy prefix (a ``Path=/`` cookie would be
    sent to every sandbox of the daemon's origin)."""
    parts = [p.strip() for p in value.split(";")]
    out = [parts[0]]
    has_path = False
    for attr in parts[1:]:
        name, _, val = attr.partition("=")
        key = name.strip().lower()
        if key == "domain":
            continue
        if key == "path":
            has_path = True
            under = val == target.prefix or val.startswith(target.prefix + "/")
            if target.prefix and val.startswith("/") and not under:
                out.append(f"Path={target.prefix}{val}")
                continue
        out.append(attr)
    if target.prefix and not has_path:
        out.append(f"Path={target.prefix}/")
    return "; ".join(out)


def forwarded_response_headers(
    status: int, headers: Headers, target: Target, scheme: str, host: str
) -> Headers:
    out: Headers = []
    for key, value in end_to_end(headers):
        name = key.lower()
        if name == b"date":
            continue  # the daemon's HTTP server sends its own
        if name == b"content-length" and (status in _BODYLESS or status < 200):
            continue  # no body follows, whatever length it names
        if name in (b"location", b"content-location"):
            text = rewrite_location(value.decode("latin-1"), target, scheme, host)
            out.append((name, text.encode("latin-1")))
        elif name == b"set-cookie":
            out.append((name, rewrite_cookie(value.decode("latin-1"), target).encode("latin-1")))
        else:
            out.append((name, value))
    return out
