"""``POST /sandboxes`` in a cluster: place the sandbox on a node, create it there.

The node a create reaches picks a node (:class:`kiln.cluster.placement.Placer`,
one store transaction). If that is itself it creates the sandbox as a single
daemon would; otherwise it sends the request on: ``POST {address}/sandboxes``
with the caller's body, query and credentials unchanged (API keys are in the
shared store, so the chosen node authenticates the caller itself) and a peer
signature (:data:`~kiln.cluster.PEER_HEADER`). A signed create is never placed
again: the receiving node creates it locally. The chosen node's answer goes back
to the caller as it is, errors included (a 409 for a name taken is the caller's
business), except when the node refuses: unreachable, or a 5xx (507 when it has no
room after all, 503 while it cannot): then the next attempt leaves it out, up to
:data:`MAX_ATTEMPTS` nodes. The create is counted as starting on the chosen node
until it is over, whatever the outcome.

What stays on the receiving node instead: a create from a saved image or with an
existing volume (their files are on the node that made them; moving them is the
shared-directory work), and E2B API creates (which go through their own routes).
Images are not a placement criterion: every node builds a built-in tier or a
catalog image from its definition in the shared store on first use.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import httpx
from fastapi import Request, Response

from kiln.api.requests import CreateSandbox
from kiln.cluster import PEER_HEADER, ClusterNode, PeerAuthError
from kiln.cluster.placement import FORWARD_TIMEOUT_S, NoCapacity, NodesBusy, Placer, Shape
from kiln.store import Node, User

from .errors import ApiError, Unauthorized, Unavailable
from .services import Services

log = logging.getLogger("kiln.cluster")

#: Nodes a create is offered to before the caller hears that none would take it.
MAX_ATTEMPTS: Final = 3
#: Headers of the caller's request that go with it to the chosen node.
_PASSED_HEADERS: Final = ("authorization", "content-type", "user-agent", "accept")


class InsufficientStorage(ApiError):
    """No node has room for the sandbox (507)."""

    status = 507


def peer_signed(cluster: ClusterNode, request: Request) -> bool:
    """Whether another node sent this request (its signature checked: 401 if bad)."""
    value = request.headers.get(PEER_HEADER)
    if value is None:
        return False
    try:
        cluster.peer.verify(value, request.method, _target(request))
    except PeerAuthError as exc:
        raise Unauthorized(str(exc)) from None
    return True


def pinned_here(body: CreateSandbox) -> bool:
    """A create whose files are on this node (a saved image, an existing volume)."""
    return body.saved_image is not None or bool(body.volumes)


async def create_placed(
    services: Services, request: Request, user: User, body: CreateSandbox
) -> dict[str, Any] | Response:
    """``POST /sandboxes`` on a cluster node (see the module's docstring)."""
    cluster = services.cluster
    assert cluster is not None
    if peer_signed(cluster, request) or pinned_here(body):
        return await services.sandboxes.create(user, body)
    engine, runtime, cpus, memory_mb = services.sandboxes.shape_of(user, body)
    shape = Shape(engine=engine, runtime=runtime, cpus=cpus, memory_mb=memory_mb)
    placer = Placer(services.store, clock=services.clock)
    payload = await request.body()
    refused: list[str] = []
    for _ in range(MAX_ATTEMPTS):
        try:
            node = await asyncio.to_thread(placer.reserve, shape, refused)
        except NodesBusy as exc:
            raise Unavailable(str(exc)) from None
        except NoCapacity as exc:
            raise InsufficientStorage(str(exc)) from None
        try:
            if node.name == cluster.name:
                return await services.sandboxes.create(user, body)
            answer = await _forward(cluster, node, request, payload)
        finally:
            await asyncio.shield(asyncio.to_thread(placer.release, node.name, shape))
        if answer is not None:
            return answer
        refused.append(node.name)
    raise InsufficientStorage(
        f"no node took the sandbox: {', '.join(refused)} refused it (see their logs)"
    )


async def _forward(
    cluster: ClusterNode, node: Node, request: Request, payload: bytes
) -> Response | None:
    """The chosen node's answer to the create; None if it refused (unreachable, 5xx)."""
    target = _target(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
    headers[PEER_HEADER] = cluster.peer.sign("POST", target)
    timeout = httpx.Timeout(FORWARD_TIMEOUT_S, connect=5.0)
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.post(node.address + target, content=payload, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("cluster: node %s did not take a create: %s", node.name, exc or type(exc))
        return None
    if resp.status_code >= 500:
        log.warning(
            "cluster: node %s refused a create (%d): %s",
            node.name,
            resp.status_code,
            resp.text[:200],
        )
        return None
    return Response(
        content=resp.content,
        status_code=resp.status_code,
        media_type=resp.headers.get("content-type", "application/json"),
    )


def _target(request: Request) -> str:
    """The request's path and query, as signed and verified."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")
