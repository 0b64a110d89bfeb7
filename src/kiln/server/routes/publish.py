"""Published ports: serve a sandbox port without auth at ``<alias>.<publish domain>``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from kiln.api.requests import PublishPort
from kiln.api.responses import PublishedPort

from ..errors import NotFoundError
from .deps import AppServices, CurrentUser, origin_of

router = APIRouter(tags=["publish"])


@router.post("/sandboxes/{sandbox}/publish", status_code=201, response_model=PublishedPort)
async def publish(
    sandbox: str, body: PublishPort, request: Request, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """Publish a port; its URL works without an API key (409 if already published
    or the alias is taken). Requests to it wake the sandbox from any state."""
    return services.publishing.publish(user, sandbox, body, origin_of(request))


@router.get("/sandboxes/{sandbox}/publish", response_model=list[PublishedPort])
async def list_published(
    sandbox: str, request: Request, user: CurrentUser, services: AppServices
) -> list[dict[str, Any]]:
    return services.publishing.list_for(user, sandbox, origin_of(request))


@router.delete("/sandboxes/{sandbox}/publish/{port}", status_code=204)
async def unpublish(sandbox: str, port: str, user: CurrentUser, services: AppServices) -> Response:
    if not (port.isascii() and port.isdigit()):
        raise NotFoundError(f"port {port!r} is not published")
    services.publishing.unpublish(user, sandbox, int(port))
    return Response(status_code=204)
