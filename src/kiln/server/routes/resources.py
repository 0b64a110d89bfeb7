"""Templates, secrets and volumes: per-user resources that outlive sandboxes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from kiln.api.requests import SECRET_NAME_RE, CreateTemplate, CreateVolume, PutSecret
from kiln.api.responses import Secret, Template, Volume

from ..errors import NotFoundError
from .deps import AppServices, CurrentUser

router = APIRouter()


# --- templates ------------------------------------------------------------------------


@router.post("/templates", status_code=201, tags=["templates"], response_model=Template)
async def create_template(
    body: CreateTemplate, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """A named sandbox spec (409 if the name is taken)."""
    return services.templates.create(user, body)


@router.get("/templates", tags=["templates"], response_model=list[Template])
async def list_templates(user: CurrentUser, services: AppServices) -> list[dict[str, Any]]:
    return services.templates.list_for(user)


@router.get("/templates/{template}", tags=["templates"], response_model=Template)
async def get_template(template: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    """By id or name."""
    return services.templates.get(user, template)


@router.delete("/templates/{template}", status_code=204, tags=["templates"])
async def delete_template(template: str, user: CurrentUser, services: AppServices) -> Response:
    services.templates.delete(user, template)
    return Response(status_code=204)


# --- secrets --------------------------------------------------------------------------


@router.post("/secrets", status_code=201, tags=["secrets"], response_model=Secret)
async def put_secret(body: PutSecret, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    """Create or replace a secret. The value is encrypted at rest and never returned."""
    return services.secrets.put(user, body)


@router.get("/secrets", tags=["secrets"], response_model=list[Secret])
async def list_secrets(user: CurrentUser, services: AppServices) -> list[dict[str, Any]]:
    """Names and timestamps only."""
    return services.secrets.list_for(user)


@router.delete("/secrets/{name}", status_code=204, tags=["secrets"])
async def delete_secret(name: str, user: CurrentUser, services: AppServices) -> Response:
    if not SECRET_NAME_RE.match(name):
        raise NotFoundError(f"secret {name!r} not found")
    services.secrets.delete(user, name)
    return Response(status_code=204)


# --- volumes --------------------------------------------------------------------------


@router.post("/volumes", status_code=201, tags=["volumes"], response_model=Volume)
async def create_volume(
    body: CreateVolume, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """A persistent ext4 volume, attachable to one live sandbox at a time."""
    return services.volumes.create(user, body)


@router.get("/volumes", tags=["volumes"], response_model=list[Volume])
async def list_volumes(user: CurrentUser, services: AppServices) -> list[dict[str, Any]]:
    return services.volumes.list_for(user)


@router.get("/volumes/{name}", tags=["volumes"], response_model=Volume)
async def get_volume(name: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    return services.volumes.get(user, name)


@router.delete("/volumes/{name}", status_code=204, tags=["volumes"])
async def delete_volume(name: str, user: CurrentUser, services: AppServices) -> Response:
    """409 while the volume is attached to a live sandbox."""
    await services.volumes.delete(user, name)
    return Response(status_code=204)
