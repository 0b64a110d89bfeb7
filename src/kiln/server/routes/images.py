"""``/images``: the images a sandbox can start from, and building new ones.

``POST /images`` builds a package-list image (a minute or more when its Debian
base is not cached) or a Dockerfile image (``dockerfile`` and a base64 tar
``context`` of at most 16 MiB; the Docker engine must be enabled). With
``Accept: application/x-ndjson`` it streams progress lines as the build goes
(the same content type as exec's events), then one ``image`` or ``error``
line; otherwise it answers once, when the build is done. A client that goes
away stops the build (a Dockerfile's ``docker build`` step runs to its end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from kiln.api.requests import CreateImage
from kiln.api.responses import ImageBuildEvent, ImageInfo

from ..errors import ApiError, to_api_error
from ..openapi import NDJSON, ndjson
from ..streaming import LiveStream
from .deps import AppServices, CurrentUser

router = APIRouter(tags=["images"])


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@router.get("/images", response_model=list[ImageInfo])
async def list_images(user: CurrentUser, services: AppServices) -> list[dict[str, Any]]:
    """Built-in tiers, global images and the caller's own (other users' are invisible)."""
    return services.catalog.list_for(user)


#: ``?owner=``: an admin's way to a user's image (by user id or name).
OwnerQuery = Annotated[
    str | None, Query(description="Admins: the user (id or name) whose image is meant")
]


@router.get("/images/{name}", response_model=ImageInfo)
async def get_image(
    name: str, user: CurrentUser, services: AppServices, owner: OwnerQuery = None
) -> dict[str, Any]:
    """One image by name (404 for unknown names and other users' images)."""
    catalog = services.catalog
    return catalog.get(catalog.as_owner(user, owner), name)


@router.post(
    "/images",
    status_code=201,
    response_model=ImageInfo,
    responses=ndjson(ImageBuildEvent, "With Accept: application/x-ndjson, build progress"),
)
async def build_image(
    body: CreateImage, request: Request, user: CurrentUser, services: AppServices
) -> Response:
    """Build an image from Debian packages and files on top of ``minimal``, or from
    a Dockerfile (``FROM minimal``) and its context, built by the Docker engine's dockerd.

    An admin's build is global; anyone else's is their own (and counts against
    their image quota). The same definition under the same name again: 200
    with the existing image; another definition under a taken name: 409.
    """
    catalog = services.catalog
    plan = catalog.prepare(user, body)
    existing, ref = plan.existing, plan.ref
    streamed = NDJSON in request.headers.get("accept", "")
    if existing is not None:
        if streamed:  # nothing to build: the stream is its last line alone
            line = _line({"type": "image", "image": catalog.view(existing)})
            return Response(line, media_type=NDJSON)
        return JSONResponse(catalog.view(existing), status_code=200)
    if not streamed:
        return JSONResponse(await catalog.build(user, plan), status_code=201)

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = time.monotonic()

    def progress(message: str) -> None:
        elapsed = round(time.monotonic() - started, 1)
        queue.put_nowait({"type": "progress", "message": message, "elapsed_s": elapsed})

    async def run() -> None:
        try:
            image = await catalog.build(user, plan, progress)
        except Exception as exc:
            error = to_api_error(exc) or ApiError(str(exc))
            queue.put_nowait({"type": "error", "message": error.message, "status": error.status})
        else:
            queue.put_nowait({"type": "image", "image": image})

    task = asyncio.create_task(run(), name=f"image-build-{ref}")

    async def lines() -> AsyncGenerator[bytes, None]:
        while True:
            event = await queue.get()
            yield _line(event)
            if event["type"] != "progress":
                return

    async def stop() -> None:
        task.cancel()  # a finished build ignores it; a running one's child is stopped
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return LiveStream(
        lines(),
        media_type=NDJSON,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        on_close=stop,
    )


@router.delete("/images/{name}", status_code=204)
async def delete_image(
    name: str, user: CurrentUser, services: AppServices, owner: OwnerQuery = None
) -> Response:
    """Remove an image (its owner or an admin; global ones: an admin). 409 while a
    sandbox uses it."""
    await services.catalog.delete(user, name, owner)
    return Response(status_code=204)
