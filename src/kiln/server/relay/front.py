"""The cluster's ASGI front: a request for a sandbox that lives on another node is
relayed there, streaming both ways, instead of being served here.

It sits outermost (before the reverse proxy and the API) and does nothing on a
single daemon (``services.cluster`` is None). On a node of a cluster:

- a request carrying :data:`~kiln.cluster.PEER_HEADER` comes from another
  node (relayed, or a create placed here): a signature that does not hold is a
  401, whatever the path; a valid one is noted as ``scope["state"]["kiln_peer"]``
  (the sending node's name) and, for a sandbox that is not this node's, answered
  421 (a relayed request is never relayed again, so a disagreement about where
  a sandbox lives cannot loop);
- a request that addresses a sandbox (:mod:`.locate`) on another node goes
  there: the caller's own headers unchanged (its key: the other node checks it
  against the shared store), the original ``Host`` (published URLs route by
  it), minus the hop-by-hop ones, plus a fresh peer signature. The answer comes
  back as the other node gave it, with ``x-kiln-node`` naming that node.
  WebSockets (the shell, proxied and published ones) are relayed message by
  message over a connection of their own;
- the home node lost (its lease ran out): with a shared directory this node
  takes the sandbox over and serves it (:mod:`kiln.cluster.takeover`; another
  node that was first gets the request instead); without one, or when it cannot
  move, 503 naming the node and since when. Unreachable or failing mid-answer:
  502 naming it;
- a sandbox of this node's that its engine does not hold (a drain moved it
  here) is adopted first, then served.

Everything else is served here: the list of sandboxes, creates and the other
routes read and write the shared store themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.cluster import PEER_HEADER, ClusterNode, PeerAuthError
from kiln.cluster.takeover import TakenElsewhere, TakeoverRefused
from kiln.store import Node, NotFound, Sandbox, rfc3339

from ..errors import to_api_error
from ..proxy.front import deny
from ..proxy.http_relay import RelayFailed, ResponseBrokeOff
from ..proxy.target import Headers, end_to_end
from ..proxy.websocket_relay import relay_websocket_over
from ..services import Services
from .http import relay_to_node
from .locate import addressed
from .peers import NodePool, NodePools, NodeUnreachable

log = logging.getLogger("kiln.server.relay")

#: Names the node that answered a relayed request (for the caller's curiosity and
#: for tests; never used for routing).
NODE_HEADER = b"x-kiln-node"
#: How long a node's row (its address, its lease) is reused before it is read again.
NODE_CACHE_S = 1.0
_PEER = PEER_HEADER.encode()

ErrorResponse = Callable[[int, str, str], Response]


class RelayFront:
    def __init__(
        self, app: ASGIApp, services: Services, errors: ErrorResponse, pools: NodePools
    ) -> None:
        self.app = app
        self.services = services
        self.errors = errors
        self.pools = pools
        self._nodes: dict[str, tuple[float, Node]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cluster = self.services.cluster
        if cluster is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            relayed_by = self._peer(cluster, scope)
            if relayed_by is not None:
                # The routes may ask (request.state.kiln_peer); the header stays for
                # them, and the reverse proxy never passes it into a sandbox.
                scope.setdefault("state", {})["kiln_peer"] = relayed_by
            sb = addressed(
                scope,
                self.services.store,
                self.services.publishing,
                self.services.envd_tokens,
            )
            if sb is not None and cluster.is_local(sb):
                await self._adopt_if_moved_here(sb)
            if sb is None or cluster.is_local(sb):
                await self.app(scope, receive, send)
                return
            if relayed_by is not None:
                # Sent here to take over a lost node's sandbox (the sender had no
                # room); any other relayed request for another node's sandbox: 421.
                if await self._taken_over_for_peer(cluster, sb):
                    await self.app(scope, receive, send)
                    return
                raise RelayFailed(
                    421,
                    f"sandbox {sb.id} lives on node {sb.node!r}, not on this node "
                    f"({cluster.name!r}); node {relayed_by!r} relayed it here, and a relayed "
                    "request is not relayed again",
                )
            try:
                home = self._home(cluster, sb)
            except HomeLost as lost:
                here = await self._take_over(sb, lost)
                if here is None:
                    await self.app(scope, receive, send)
                    return
                home = here
        except RelayFailed as exc:
            await self._refuse(scope, receive, send, exc.status, exc.message)
            return
        except Exception as exc:
            api = to_api_error(exc)
            if api is None:
                raise
            await self._refuse(scope, receive, send, api.status, api.message)
            return
        await self._relay(cluster, home, scope, receive, send)

    # --- deciding -------------------------------------------------------------------

    def _peer(self, cluster: ClusterNode, scope: Scope) -> str | None:
        """The node that relayed this request here (None: a caller's own); a 401 for
        a signature that does not hold."""
        value = next((v for k, v in scope["headers"] if k == _PEER), None)
        if value is None:
            return None
        method = "GET" if scope["type"] == "websocket" else scope["method"]
        raw = _target(scope).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        # Signed as sent (the relay) or with the decoded path (a placed create).
        decoded = scope["path"] + (f"?{query}" if query else "")
        error: PeerAuthError | None = None
        for target in dict.fromkeys((raw, decoded)):
            try:
                return cluster.peer.verify(value.decode("latin-1"), method, target)
            except PeerAuthError as exc:
                error = error or exc
        raise RelayFailed(401, f"{PEER_HEADER}: {error}")

    def _home(self, cluster: ClusterNode, sb: Sandbox) -> Node:
        assert sb.node is not None
        now = time.time()
        cached = self._nodes.get(sb.node)
        if cached is not None and now - cached[0] < NODE_CACHE_S:
            node = cached[1]
        else:
            try:
                node = cluster.store.get_node(sb.node)
            except NotFound:
                raise RelayFailed(
                    503, f"sandbox {sb.id} lives on node {sb.node!r}, which is not registered"
                ) from None
            self._nodes[sb.node] = (now, node)
        if node.lost(now):
            raise HomeLost(
                503,
                f"sandbox {sb.id} lives on node {node.name!r}, which is lost "
                f"(no lease since {rfc3339(node.lease_until)})",
            )
        return node

    # --- moving (a cluster with a shared directory) ----------------------------------

    async def _take_over(self, sb: Sandbox, lost: HomeLost) -> Node | None:
        """Take ``sb`` over from its lost node: None when it is this node's now, else
        the node that took it first or has the room for it; the 503 when it cannot
        move."""
        takeover = self.services.takeover
        if takeover is None:
            raise lost
        try:
            await takeover.take_over(sb)
        except TakenElsewhere as exc:
            if exc.node is None or self.services.cluster is None:
                raise lost from exc
            self._nodes.pop(exc.node, None)
            return self._home(self.services.cluster, dataclasses.replace(sb, node=exc.node))
        except TakeoverRefused as exc:
            raise RelayFailed(lost.status, f"{lost.message}; {exc}") from exc
        return None

    async def _taken_over_for_peer(self, cluster: ClusterNode, sb: Sandbox) -> bool:
        """Whether this node took ``sb`` over for a relayed request: its home is lost
        and this node has room (it sends the request on to no one)."""
        takeover = self.services.takeover
        if takeover is None:
            return False
        try:
            self._home(cluster, sb)
        except HomeLost as lost:
            try:
                await takeover.take_over(sb, elsewhere=False)
            except (TakenElsewhere, TakeoverRefused) as exc:
                raise RelayFailed(lost.status, f"{lost.message}; {exc}") from exc
            return True
        return False

    async def _adopt_if_moved_here(self, sb: Sandbox) -> None:
        """A sandbox a drain moved to this node is adopted on its first request here."""
        takeover = self.services.takeover
        if takeover is None or sb.engine_state is None or takeover.holds(sb.id):
            return
        try:
            await takeover.adopt_claimed(sb)
        except TakeoverRefused as exc:
            # Served as it is: the route says what is wrong with it.
            log.warning("sandbox %s is this node's but cannot be adopted: %s", sb.id, exc)

    # --- relaying -------------------------------------------------------------------

    async def _relay(
        self, cluster: ClusterNode, node: Node, scope: Scope, receive: Receive, send: Send
    ) -> None:
        method = "GET" if scope["type"] == "websocket" else scope["method"]
        target = _target(scope)
        headers = _forwarded(scope)
        headers.append((_PEER, cluster.peer.sign(method, target.decode("latin-1")).encode()))
        # A WebSocket's handshake request is taken first, so any answer may follow it.
        if scope["type"] == "websocket" and (await receive())["type"] != "websocket.connect":
            return
        try:
            try:
                pool = await self.pools.get(node.name, node.address)
            except ValueError as exc:
                raise RelayFailed(502, f"node {node.name!r}: {exc}") from exc
            if scope["type"] == "websocket":
                await self._relay_websocket(
                    node,
                    pool=pool,
                    scope=scope,
                    receive=receive,
                    send=send,
                    target=target,
                    headers=headers,
                )
                return
            answer = [(NODE_HEADER, node.name.encode())]
            await relay_to_node(
                scope,
                receive,
                send,
                pool=pool,
                target=target,
                headers=headers,
                response_headers=answer,
            )
        except RelayFailed as exc:
            if exc.status >= 500:
                log.warning("%s %s: %s", method, scope["path"], exc.message)
            await self._refuse(scope, receive, send, exc.status, exc.message, connected=True)
        except ResponseBrokeOff as exc:
            log.info("%s %s: %s", method, scope["path"], exc)

    async def _relay_websocket(
        self,
        node: Node,
        *,
        pool: NodePool,
        scope: Scope,
        receive: Receive,
        send: Send,
        target: bytes,
        headers: Headers,
    ) -> None:
        where = f"node {node.name!r} ({pool.origin.host}:{pool.origin.port})"
        try:
            stream = await pool.open_stream()
        except NodeUnreachable as exc:
            raise RelayFailed(502, f"{where} cannot be reached: {exc}") from exc
        scheme = "wss" if pool.origin.scheme == "https" else "ws"
        host = pool.origin.host_header.decode()
        await relay_websocket_over(
            stream,
            scope,
            receive,
            send,
            uri=f"{scheme}://{host}{target.decode('latin-1')}",
            headers=headers,
            what=where,
        )

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        message: str,
        *,
        connected: bool = False,
    ) -> None:
        if scope["type"] == "websocket":
            if not connected and (await receive())["type"] != "websocket.connect":
                return
            await deny(scope, send, status, message)
            return
        await self.errors(status, message, scope["path"])(scope, receive, send)


class HomeLost(RelayFailed):
    """The node a sandbox lives on is lost."""


def _target(scope: Scope) -> bytes:
    """The request target as the client sent it: raw path and query."""
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return path + (b"?" + query if query else b"")


#: What the other node's server sets for itself, or what belongs to one connection.
_OWN = frozenset({b"expect", _PEER})


def _forwarded(scope: Scope) -> Headers:
    """The caller's headers for the other node: unchanged (credentials, cookies, E2B's
    headers, the original ``Host``), minus hop-by-hop ones; a WebSocket's handshake
    headers are the relay's own."""
    websocket = scope["type"] == "websocket"
    out: Headers = []
    incoming: Headers = list(scope["headers"])
    for key, value in end_to_end(incoming):
        name = key.lower()
        if name in _OWN or (websocket and name.startswith(b"sec-websocket-")):
            continue
        out.append((name, value))
    if not websocket:
        chunked = any(
            k.lower() == b"transfer-encoding" and v.lower().endswith(b"chunked")
            for k, v in incoming
        )
        if chunked and not any(k == b"content-length" for k, _ in out):
            out.append((b"transfer-encoding", b"chunked"))
    return out
