"""Sandbox lifecycle, sessions and ports."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response

from kiln.api.requests import CreateSandbox, ForkSandbox, PatchSandbox, SaveSandbox
from kiln.api.responses import ErrorBody, Port, SandboxInfo, SavedImage, SessionInfo

from ..errors import BadRequest
from ..placing import create_placed
from .deps import AppServices, CurrentUser, origin_of

router = APIRouter(tags=["sandboxes"])


@router.post(
    "/sandboxes",
    status_code=201,
    response_model=SandboxInfo,
    responses={507: {"model": ErrorBody, "description": "No node of the cluster has room for it"}},
)
async def create_sandbox(
    request: Request,
    user: CurrentUser,
    services: AppServices,
    body: Annotated[CreateSandbox | None, Body()] = None,
) -> dict[str, Any] | Response:
    """Create (and boot) a sandbox; every field of the body is optional. In a cluster
    it is placed on the node with the most room among a few (its ``node``)."""
    if services.cluster is not None:
        return await create_placed(services, request, user, body or CreateSandbox())
    return await services.sandboxes.create(user, body or CreateSandbox())


@router.get("/sandboxes", response_model=list[SandboxInfo])
async def list_sandboxes(
    user: CurrentUser,
    services: AppServices,
    label: Annotated[
        list[str] | None,
        Query(description="KEY=VALUE; repeatable, a sandbox must carry all of them"),
    ] = None,
) -> list[dict[str, Any]]:
    """The user's sandboxes (never wakes one), optionally only those with given labels."""
    wanted = label_filter(label or [])
    if wanted is None:
        return []
    return services.sandboxes.list_for(user, labels=wanted)


def label_filter(values: list[str]) -> dict[str, str] | None:
    """``["team=ml", "env=dev"]`` → ``{"team": "ml", "env": "dev"}``; None when two
    filters ask one key for different values (nothing can match both)."""
    wanted: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"label filter must be KEY=VALUE, got {item!r}")
        if wanted.setdefault(key, value) != value:
            return None
    return wanted


@router.get("/sandboxes/{sandbox}", response_model=SandboxInfo)
async def get_sandbox(sandbox: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    """One sandbox by id or name (never wakes it)."""
    return services.sandboxes.get(user, sandbox)


@router.patch("/sandboxes/{sandbox}", response_model=SandboxInfo)
async def patch_sandbox(
    sandbox: str, body: PatchSandbox, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """Rename a sandbox and/or change ``keep_hot``; running sessions are undisturbed."""
    return services.sandboxes.patch(user, sandbox, body)


@router.delete("/sandboxes/{sandbox}", status_code=204)
async def delete_sandbox(sandbox: str, user: CurrentUser, services: AppServices) -> Response:
    """Destroy a sandbox: frees its IP, TAP, disks and publish rules."""
    await services.sandboxes.delete(user, sandbox)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox}/stop", response_model=SandboxInfo)
async def stop_sandbox(sandbox: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    """Snapshot to disk and stop."""
    return await services.sandboxes.stop(user, sandbox)


@router.post("/sandboxes/{sandbox}/start", response_model=SandboxInfo)
async def start_sandbox(sandbox: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    """Restore a stopped sandbox."""
    return await services.sandboxes.start(user, sandbox)


@router.post("/sandboxes/{sandbox}/fork", status_code=201, response_model=SandboxInfo)
async def fork_sandbox(
    sandbox: str,
    user: CurrentUser,
    services: AppServices,
    body: Annotated[ForkSandbox | None, Body()] = None,
) -> dict[str, Any]:
    """A new sandbox whose disk, memory and running processes are a copy of this
    one's now (its own address, hostname and token); both go on independently.
    409 when it has volumes attached or its engine cannot fork it."""
    return await services.sandboxes.fork(user, sandbox, body or ForkSandbox())


@router.post(
    "/sandboxes/{sandbox}/save", status_code=201, response_model=SavedImage, tags=["saved images"]
)
async def save_sandbox(
    sandbox: str, body: SaveSandbox, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """Save the sandbox as a named image private to you: its disk and, where its engine
    can (``memory``), its memory, so sandboxes created from it (``saved_image`` on
    create) start with its processes running. The sandbox goes on (a running one
    stands still briefly). 409 when the name is taken or it has volumes attached."""
    return await services.saved_images.save(user, sandbox, body)


@router.get("/saved-images", response_model=list[SavedImage], tags=["saved images"])
async def list_saved_images(user: CurrentUser, services: AppServices) -> list[dict[str, Any]]:
    """Your saved images (nobody else's)."""
    return services.saved_images.list_for(user)


@router.get("/saved-images/{name}", response_model=SavedImage, tags=["saved images"])
async def get_saved_image(name: str, user: CurrentUser, services: AppServices) -> dict[str, Any]:
    return services.saved_images.get(user, name)


@router.delete("/saved-images/{name}", status_code=204, tags=["saved images"])
async def delete_saved_image(name: str, user: CurrentUser, services: AppServices) -> Response:
    """Delete your saved image and its files; sandboxes made from it go on."""
    await services.saved_images.delete(user, name)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox}/sessions", response_model=list[SessionInfo])
async def list_sessions(
    sandbox: str, user: CurrentUser, services: AppServices
) -> list[dict[str, Any]]:
    """The sandbox's exec and TTY sessions (SessionInfo objects)."""
    _, client = await services.sandboxes.agent(user, sandbox)
    return [s.to_json() for s in await client.list_sessions()]


@router.delete("/sandboxes/{sandbox}/sessions/{session_id}", status_code=204)
async def kill_session(
    sandbox: str, session_id: str, user: CurrentUser, services: AppServices
) -> Response:
    """SIGKILL a session's process group."""
    _, client = await services.sandboxes.agent(user, sandbox)
    await client.kill_session(session_id)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox}/ports", response_model=list[Port])
async def sandbox_ports(
    sandbox: str, request: Request, user: CurrentUser, services: AppServices
) -> list[dict[str, Any]]:
    """TCP ports listening inside the sandbox (wakes it), with their proxy URLs and
    published URLs (``published_url``, null when the port is not published)."""
    return await services.sandboxes.ports(user, sandbox, origin_of(request))


@router.get("/ports", response_model=list[Port])
async def all_ports(
    request: Request, user: CurrentUser, services: AppServices
) -> list[dict[str, Any]]:
    """Listening ports of all the user's running (hot or warm) sandboxes."""
    return await services.sandboxes.all_ports(user, origin_of(request))
