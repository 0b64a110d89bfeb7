"""The ASGI front of the daemon: proxied and published traffic is taken here, the
rest goes on to the API.

- ``Host: <alias>.<publish domain>`` → the published port, without auth.
- ``/sandboxes/{id}/proxy/{port}/{path}`` → that port, for the sandbox's owner
  (``Authorization: Bearer`` or ``?token=``, which are not passed on).

Either way the sandbox is woken first (one restore however many requests
find it cold) and the request is relayed over the agent's forward channel:
HTTP through a per-sandbox connection pool, WebSocket upgrades by
:mod:`.websocket_relay`. Proxy traffic skips the API's body limits: bodies
stream through and are never held whole.
"""

from __future__ import annotations

import json
import logging
import re

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.agent_client import AgentClient
from kiln.store import NotFound, User

from ..auth import authenticate, bearer_token
from ..errors import BadRequest, NotFoundError, to_api_error
from ..services import Services
from .http_relay import RelayFailed, ResponseBrokeOff, relay_http
from .pools import Pools
from .target import Target, query_token, strip_query_token
from .websocket_relay import relay_websocket

log = logging.getLogger("kiln.server.proxy")

_PORT = re.compile(r"[0-9]{1,5}")
_PROXY_PATH = re.compile(r"^/sandboxes/([^/]+)/proxy(?:/([^/]*))?(/.*)?$")


class ProxyFront:
    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        self.pools = Pools()
        services.sandboxes.on_reset(self.pools.drop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        alias = self.services.publishing.alias_of(headers.get("host", ""))
        match = _PROXY_PATH.match(scope["path"]) if alias is None else None
        if alias is None and match is None:
            await self.app(scope, receive, send)
            return
        # A WebSocket's handshake request is taken first, so any answer may follow it.
        if scope["type"] == "websocket" and (await receive())["type"] != "websocket.connect":
            return
        try:
            if alias is not None:
                await self._published(alias, scope, receive, send)
            elif match is not None:
                await self._proxied(match, scope, receive, send)
        except RelayFailed as exc:
            await deny(scope, send, exc.status, exc.message)
        except ResponseBrokeOff as exc:
            # The answer had started: the client sees it cut short. One line in the
            # log (a dev server restarting mid-response is nothing to shout about).
            log.info("%s %s: %s", scope.get("method", "WS"), scope.get("path"), exc)
        except Exception as exc:
            api = to_api_error(exc)
            if api is None:
                raise
            await deny(scope, send, api.status, api.message)

    async def _published(self, alias: str, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            rule = self.services.store.publish_rule_by_alias(alias)
        except NotFound as exc:
            raise NotFoundError(f"nothing is published as {alias!r}") from exc
        sb, client = await self.services.sandboxes.wake(
            self.services.store.get_sandbox(rule.sandbox_id)
        )
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        # Anyone may send these; a daemon key among them (a user who also has the
        # API open) must still not reach the sandbox.
        keys = frozenset(t for t in self._tokens(scope, query) if self._user_of(t) is not None)
        target = Target(
            sandbox_id=sb.id,
            label=repr(alias),  # anonymous visitors learn no sandbox names
            port=rule.port,
            path=path,
            query=strip_query_token(query, keys),
            prefix="",
            api_keys=keys,
        )
        await self._relay(target, client, scope, receive, send)

    async def _proxied(
        self, match: re.Match[str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        ref, port_text, rest = match.group(1), match.group(2), match.group(3)
        query = scope.get("query_string", b"")
        user, key = self._user(scope, query)
        if port_text is None or not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise BadRequest(f"invalid port {port_text or ''!r}: expected a number in 1..65535")
        port = int(port_text)
        sb = self.services.sandboxes.find(user, ref)
        prefix = f"/sandboxes/{ref}/proxy/{port}"
        if rest is None and scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            # Without the slash the app's relative links would resolve one level up.
            location = prefix + "/" + ("?" + query.decode("latin-1") if query else "")
            await _redirect(send, location)
            return
        sb, client = await self.services.sandboxes.wake(sb)
        target = Target(
            sandbox_id=sb.id,
            label=f"sandbox {sb.name}",
            port=port,
            path=_raw_rest(scope),
            query=strip_query_token(query, frozenset({key})),
            prefix=prefix,
            api_keys=frozenset({key}),
        )
        await self._relay(target, client, scope, receive, send)

    @staticmethod
    def _tokens(scope: Scope, query: bytes) -> list[str]:
        """Candidate API keys: the Bearer header; for a WebSocket also ``?token=``
        (browsers cannot set its headers). Plain HTTP takes no key in the URL: it
        would travel on in ``Referer`` and be readable by the page."""
        tokens = []
        header = bearer_token(Headers(scope=scope))
        if header is not None:
            tokens.append(header)
        if scope["type"] == "websocket":
            token = query_token(query)
            if token:
                tokens.append(token)
        return tokens

    def _user_of(self, token: str) -> User | None:
        return self.services.store.user_by_key(token)

    def _user(self, scope: Scope, query: bytes) -> tuple[User, str]:
        """The owner of the first candidate key that is one (an app's own Bearer
        header may sit beside a WebSocket's ``?token=``); 401 otherwise."""
        tokens = self._tokens(scope, query)
        for token in tokens:
            user = self._user_of(token)
            if user is not None:
                return user, token
        authenticate(self.services, tokens[0] if tokens else None)  # raises the 401
        raise AssertionError("unreachable")

    async def _relay(
        self, target: Target, client: AgentClient, scope: Scope, receive: Receive, send: Send
    ) -> None:
        sandboxes = self.services.sandboxes

        def touch() -> None:
            sandboxes.touch(target.sandbox_id)

        if scope["type"] == "websocket":
            await relay_websocket(scope, receive, send, client=client, target=target, touch=touch)
            return
        pool = self.pools.get(target.sandbox_id, client, target.label)
        await relay_http(scope, receive, send, pool=pool, target=target, touch=touch)


def _raw_rest(scope: Scope) -> bytes:
    """The path after ``/sandboxes/{id}/proxy/{port}``, still percent-encoded."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    raw = raw.split(b"?", 1)[0]
    parts = raw.split(b"/", 5)
    return b"/" + parts[5] if len(parts) > 5 else b"/"


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 308,
            "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def deny(scope: Scope, send: Send, status: int, message: str) -> None:
    """Answer with ``{"error": message}``: an HTTP response, or for a WebSocket the
    refusal of its handshake."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status > 502:  # 502 is the service's business (nothing listens yet, say)
        log.warning("%s %s: %s", scope.get("method", "WS"), scope.get("path"), message)
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008})
            return
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
