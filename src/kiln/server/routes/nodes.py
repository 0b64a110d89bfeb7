"""The cluster's nodes (admins only; an empty list on a single daemon)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from kiln.api.responses import NodeInfo
from kiln.store import NodeState

from ..nodes import NodeService
from .deps import AppServices, CurrentUser

router = APIRouter(tags=["nodes"])


@router.get("/nodes", response_model=list[NodeInfo])
async def list_nodes(user: CurrentUser, services: AppServices) -> list[dict[str, Any]]:
    """Every node of the cluster, with what its sandboxes take and its lease."""
    return NodeService(services).list_for(user)


@router.get("/nodes/{name}", response_model=NodeInfo)
async def get_node(name: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    return NodeService(services).get(user, name)


@router.post("/nodes/{name}/drain", response_model=NodeInfo)
async def drain_node(name: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    """No new sandbox is placed on it; its running ones stay, its stopped ones move to
    other nodes (with a shared directory, see the README: Running several hosts)."""
    return NodeService(services).set_state(user, name, NodeState.DRAINING)


@router.post("/nodes/{name}/undrain", response_model=NodeInfo)
async def undrain_node(name: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    """It takes new sandboxes again."""
    return NodeService(services).set_state(user, name, NodeState.ACTIVE)


@router.delete("/nodes/{name}", status_code=204)
async def delete_node(name: str, user: CurrentUser, services: AppServices) -> Response:
    """Forget a node (409 while live sandboxes are on it). A daemon still running
    under that name registers again at its next renewal."""
    NodeService(services).delete(user, name)
    return Response(status_code=204)
