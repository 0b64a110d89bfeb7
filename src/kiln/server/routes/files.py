"""Files of a sandbox.

``GET``/``HEAD``/``PUT``/``DELETE /sandboxes/{id}/files?path=``: read (or list with
``ls=true``, ``depth``), stat, write, remove (``recursive``);
``POST /sandboxes/{id}/files/mkdir`` and ``/files/move``; ``GET
/sandboxes/{id}/files/watch?path=`` streams a directory's changes as NDJSON.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from kiln.agent_client import DirWatch, FileReader
from kiln.api.requests import MkdirBody, MoveBody
from kiln.api.responses import DirMade, FileChange, FileEntry, FileWritten, ListingCap
from kiln.protocol import MAX_LS_DEPTH, InvalidMessage, encode_json, parse_mode

from ..errors import BadRequest, LengthRequired, PayloadTooLarge
from ..openapi import NDJSON, ndjson
from ..streaming import LiveStream
from .deps import AppServices, CurrentUser

router = APIRouter(tags=["files"])

#: A read with truncation options is buffered up to this much before answering, so a
#: read that turns out whole still gets its Content-Length.
PEEK_BYTES = 1 << 20

PathParam = Annotated[str, Query(min_length=1, max_length=4096, description="path in the sandbox")]
Count = Annotated[int, Query(ge=0)]


def _check_path(path: str) -> str:
    if "\x00" in path:
        raise BadRequest("path must not contain NUL bytes")
    return path


def _truthy(value: str | None, name: str = "ls") -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise BadRequest(f"{name} must be true or false, got {value!r}")


@router.head(
    "/sandboxes/{sandbox}/files",
    response_class=Response,
    responses={
        200: {
            "description": "The answer is headers only",
            "headers": {
                "X-File-Size": {"schema": {"type": "integer"}, "description": "bytes"},
                "X-File-Mode": {"schema": {"type": "string"}, "description": "octal, 0644"},
                "X-File-IsDir": {"schema": {"type": "boolean"}},
            },
        }
    },
)
async def stat_file(
    sandbox: str, user: CurrentUser, services: AppServices, path: PathParam
) -> Response:
    """``X-File-Size``, ``X-File-Mode`` and ``X-File-IsDir`` of a path (404 if missing)."""
    _check_path(path)
    _, client = await services.sandboxes.agent(user, sandbox)
    info = await client.stat(path)
    return Response(
        status_code=200,
        headers={
            "X-File-Size": str(info.size),
            "X-File-Mode": info.mode,
            "X-File-IsDir": "true" if info.is_dir else "false",
        },
    )


@router.get(
    "/sandboxes/{sandbox}/files",
    # The JSON answer is ls=true's; a read answers the file's bytes.
    response_model=list[FileEntry | ListingCap],
    responses={
        200: {
            "description": "The file's bytes, or with ls=true its directory listing",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def read_file(
    *,
    sandbox: str,
    user: CurrentUser,
    services: AppServices,
    path: PathParam,
    offset: Count = 0,
    limit: Count = 0,
    max_bytes: Count = 0,
    ls: str | None = None,
    depth: Annotated[int | None, Query(ge=1, le=MAX_LS_DEPTH)] = None,
) -> Response:
    """The file's bytes (``X-File-Size`` always; ``Content-Length`` only when the read
    is whole), or with ``ls=true`` the directory listing (FileInfo objects, and a
    ``{"name": "...", "truncated": true, "total": N}`` sentinel when capped); with
    ``depth`` (2 and more) subdirectories are listed too and entries carry ``path``."""
    _check_path(path)
    listing = _truthy(ls)
    if depth is not None and not listing:
        raise BadRequest("depth goes with ls=true")
    _, client = await services.sandboxes.agent(user, sandbox)
    if listing:
        result = await client.ls(path, depth=depth)
        entries: list[dict[str, Any]] = [e.to_json() for e in result.entries]
        if result.truncated:
            entries.append({"name": "...", "truncated": True, "total": result.total})
        return JSONResponse(entries)

    reader = client.read_file_stream(path, offset=offset, limit=limit, max_bytes=max_bytes)
    await reader.__aenter__()  # errors (missing file, a directory) surface here, as 4xx
    try:
        size = reader.size
        headers = {"X-File-Size": str(size), "X-File-Mode": reader.mode}
        whole = offset <= 1 and limit == 0 and (max_bytes == 0 or max_bytes >= size)
        if whole:
            headers["Content-Length"] = str(size)
            return LiveStream(
                _relay(reader, [], cap=size), headers=headers, on_close=_closer(reader)
            )
        # Truncating options: read ahead to learn whether the result is the whole file.
        peeked: list[bytes] = []
        got = 0
        async for chunk in reader:
            peeked.append(chunk)
            got += len(chunk)
            if got > PEEK_BYTES:
                break
        else:
            await reader.__aexit__(None, None, None)
            data = b"".join(peeked)
            if len(data) == size:
                headers["Content-Length"] = str(size)
                return Response(data, headers=headers, media_type="application/octet-stream")
            return LiveStream(_once(data), headers=headers)
        return LiveStream(
            _relay(reader, peeked, cap=None), headers=headers, on_close=_closer(reader)
        )
    except BaseException as exc:
        await reader.__aexit__(type(exc), exc, exc.__traceback__)
        raise


def _closer(reader: FileReader) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        # Idempotent: after a complete read _relay has closed it politely already.
        await reader.__aexit__(GeneratorExit, GeneratorExit(), None)

    return close


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


async def _relay(
    reader: FileReader, first: list[bytes], cap: int | None
) -> AsyncGenerator[bytes, None]:
    """Stream the rest of ``reader`` after ``first``; never more than ``cap`` bytes
    (the declared Content-Length, in case the file grew meanwhile)."""
    failed: BaseException | None = None
    try:
        sent = 0
        for chunk in first:
            sent += len(chunk)
            yield chunk
        async for received in reader:
            chunk = received
            if cap is not None and sent + len(chunk) > cap:
                chunk = chunk[: cap - sent]
            sent += len(chunk)
            if chunk:
                yield chunk
            if cap is not None and sent >= cap:
                failed = GeneratorExit()  # stop early: close the connection, not politely
                break
    except BaseException as exc:
        failed = exc
        raise
    finally:
        if failed is None:
            await reader.__aexit__(None, None, None)
        else:
            await reader.__aexit__(type(failed), failed, None)


@router.put("/sandboxes/{sandbox}/files", response_model=FileWritten)
async def write_file(
    *,
    sandbox: str,
    request: Request,
    user: CurrentUser,
    services: AppServices,
    path: PathParam,
    mode: str | None = None,
) -> dict[str, Any]:
    """Write the request body to ``path`` atomically (``Content-Length`` required)."""
    _check_path(path)
    length = request.headers.get("content-length")
    if length is None:
        raise LengthRequired("Content-Length is required")
    if not length.isdigit():
        raise BadRequest(f"invalid Content-Length {length!r}")
    size = int(length)
    limit = services.config.max_upload_bytes
    if size > limit:
        raise PayloadTooLarge(f"upload of {size} bytes exceeds the limit of {limit} bytes")
    octal: str | None = None
    if mode is not None:
        try:
            octal = f"{parse_mode(mode):04o}"
        except InvalidMessage as exc:
            raise BadRequest(str(exc)) from None
    sb, client = await services.sandboxes.agent(user, sandbox)
    try:
        await client.write_file(path, request.stream(), size=size, mode=octal)
    except ClientDisconnect:
        raise BadRequest("the upload ended before Content-Length bytes arrived") from None
    except ValueError as exc:  # the body was not Content-Length bytes long
        raise BadRequest(str(exc)) from None
    services.sandboxes.touch(sb.id)
    return {"path": path, "size": size}


@router.delete("/sandboxes/{sandbox}/files", status_code=204)
async def remove_file(
    *,
    sandbox: str,
    user: CurrentUser,
    services: AppServices,
    path: PathParam,
    recursive: str | None = None,
) -> Response:
    """Remove a file, a symlink or an empty directory; with ``recursive=true`` a
    directory and everything in it. 404 when nothing is there."""
    _check_path(path)
    tree = _truthy(recursive, "recursive")
    sb, client = await services.sandboxes.agent(user, sandbox)
    await client.remove(path, recursive=tree)
    services.sandboxes.touch(sb.id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox}/files/mkdir", response_model=DirMade)
async def make_dir(
    sandbox: str, body: MkdirBody, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """Create a directory: ``{"path", "created"}`` (``created`` false: it existed).
    409 when a file is in the way."""
    sb, client = await services.sandboxes.agent(user, sandbox)
    made = await client.mkdir(body.path, parents=body.parents, mode=body.mode)
    services.sandboxes.touch(sb.id)
    return {"path": made.info.path, "created": made.created}


@router.post(
    "/sandboxes/{sandbox}/files/move",
    response_model=FileEntry,
    response_model_exclude_unset=True,  # FileInfo leaves out what it does not know
)
async def move_file(
    sandbox: str, body: MoveBody, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """Rename ``source`` to ``destination``: the destination's FileInfo (with
    ``path``). 409 when the destination exists and ``overwrite`` is false."""
    sb, client = await services.sandboxes.agent(user, sandbox)
    info = await client.move(body.source, body.destination, overwrite=body.overwrite)
    services.sandboxes.touch(sb.id)
    return info.to_json()


@router.get(
    "/sandboxes/{sandbox}/files/watch",
    responses=ndjson(FileChange, "One change of the directory per line"),
)
async def watch_dir(
    *,
    sandbox: str,
    user: CurrentUser,
    services: AppServices,
    path: PathParam,
    recursive: str | None = None,
) -> Response:
    """A directory's changes as NDJSON, one ``{"name", "type"}`` per line (``type``:
    create, write, remove, rename, chmod; ``name`` relative to ``path``), until the
    client disconnects or the directory is removed."""
    _check_path(path)
    tree = _truthy(recursive, "recursive")
    sb, client = await services.sandboxes.agent(user, sandbox)
    watch = client.watch_dir(path, recursive=tree)
    await watch.__aenter__()  # a missing directory is a 404 here, before the stream
    services.sandboxes.touch(sb.id)
    return LiveStream(_events(watch), media_type=NDJSON, on_close=_stop(watch))


async def _events(watch: DirWatch) -> AsyncGenerator[bytes, None]:
    try:
        async for event in watch:
            yield encode_json(event.to_json()) + b"\n"
    finally:
        watch.close()


def _stop(watch: DirWatch) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        watch.close()

    return stop
