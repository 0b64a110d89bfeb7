"""envd's ``GET``/``POST /files`` (under ``/e2b/envd``): download and upload, on the
agent's streaming file read and atomic file write.

- ``GET /files?path=&username=``: the file's bytes (``Content-Length`` set).
- ``POST /files?path=&username=`` with ``application/octet-stream``: the body is
  the file (``Content-Encoding: gzip`` accepted); with ``multipart/form-data``:
  one or more ``file`` parts, each written to the part's file name, or to
  ``path`` when there is one part and ``path`` is given. The answer is envd's:
  a JSON list of ``{"name", "type": "file", "path"}``.

The user is ``username`` (the sandbox's default account when absent, or root):
the agent writes with their permissions, and new files and directories are theirs.
Uploads are streamed: a body with a ``Content-Length`` goes to the agent as it
arrives; one without (chunked, compressed) or a multipart part is spooled to a
temporary file first (in memory up to :data:`SPOOL_MEMORY`, then on disk), never
held whole in memory. Either way kiln's upload limit (``max_upload_bytes``)
bounds what one request may carry. Errors are envd's ``{"code", "message"}``.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import tempfile
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import IO, Annotated, Any, Final
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message as AsgiMessage

from kiln.agent_client import AgentError, FileReader
from kiln.protocol import ROOT_USER, SANDBOX_USER

from ..auth import services_of
from ..streaming import LiveStream
from .connect import Code, ConnectError
from .envd import PREFIX, EnvdCallDep, EnvdHttpError
from .filesystem import fs_error
from .users import E2B_USER, default_user, home_of

#: A spooled upload stays in memory up to this size, then moves to a temporary file.
SPOOL_MEMORY: Final = 1 << 20
#: Parts one multipart upload may have.
MAX_PARTS: Final = 1000
_CHUNK: Final = 1 << 20

_HTTP_STATUS: Final = {
    Code.INVALID_ARGUMENT: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.FAILED_PRECONDITION: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 502,
    Code.DEADLINE_EXCEEDED: 504,
}

router = APIRouter(prefix=PREFIX, tags=["e2b"], include_in_schema=False)

PathQuery = Annotated[str | None, Query(max_length=4096)]
UserQuery = Annotated[str | None, Query(max_length=256)]


def _http(exc: BaseException) -> BaseException:
    """An agent's error as envd's HTTP error (anything unknown stays as it is)."""
    err = fs_error(exc)
    if isinstance(err, ConnectError):
        return EnvdHttpError(_HTTP_STATUS.get(err.code, 500), err.message)
    return err


def files_user(call: Any, username: str | None) -> str:
    """The account of a /files call: ``username`` is E2B's default name, the
    sandbox's own default, or root."""
    default = default_user(call.sandbox)
    if username is None or username in ("", E2B_USER, SANDBOX_USER, default):
        return default
    if username == ROOT_USER:
        return ROOT_USER
    raise EnvdHttpError(400, f"unknown user {username!r}: files are {default!r}'s or root's")


def absolute(path: str, user: str) -> str:
    """Where the agent puts ``path`` for ``user`` (``~`` and relative paths from home)."""
    home = home_of(user)
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    return posixpath.normpath(posixpath.join(home, path))


def _checked_path(path: str | None) -> str:
    if not path:
        raise EnvdHttpError(400, "the path query parameter is required")
    if "\x00" in path:
        raise EnvdHttpError(400, "path must not contain NUL bytes")
    return path


# ---- download --------------------------------------------------------------------


@router.get("/files")
async def download(
    call: EnvdCallDep, path: PathQuery = None, username: UserQuery = None
) -> Response:
    target = _checked_path(path)
    user = files_user(call, username)
    reader = call.agent.read_file_stream(target, user=user)
    try:
        await reader.__aenter__()
    except AgentError as exc:
        raise _http(exc) from exc
    call.touch()
    name = posixpath.basename(target.rstrip("/")) or "download"
    headers = {
        "Content-Length": str(reader.size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{_quote(name)}",
    }
    return LiveStream(_relay(reader), headers=headers, on_close=_closer(reader))


def _quote(name: str) -> str:
    return quote(name, safe="")


async def _relay(reader: FileReader) -> AsyncGenerator[bytes, None]:
    """The file's bytes, never more than announced (the file may grow meanwhile)."""
    left = reader.size
    try:
        async for chunk in reader:
            piece = chunk[:left]
            left -= len(piece)
            if piece:
                yield piece
            if left <= 0:
                break
    finally:
        await reader.__aexit__(None, None, None)


def _closer(reader: FileReader) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        await reader.__aexit__(None, None, None)

    return close


# ---- upload ----------------------------------------------------------------------


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _limit(request: Request) -> int:
    limit: int = services_of(request).config.max_upload_bytes
    return limit


def _too_large(limit: int) -> EnvdHttpError:
    return EnvdHttpError(413, f"the upload exceeds the limit of {limit} bytes")


@router.post("/files")
async def upload(
    request: Request, call: EnvdCallDep, path: PathQuery = None, username: UserQuery = None
) -> JSONResponse:
    user = files_user(call, username)
    limit = _limit(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    if _media_type(request) == "multipart/form-data":
        written = await _upload_multipart(request, call, path, user, limit)
    else:
        written = [await _upload_body(request, call, _checked_path(path), user, limit)]
    call.touch()
    return JSONResponse(
        [{"name": posixpath.basename(p), "type": "file", "path": p} for p in written]
    )


async def _write(call: Any, target: str, user: str, source: Any, size: int) -> str:
    try:
        await call.agent.write_file(target, source, size=size, user=user)
    except AgentError as exc:
        raise _http(exc) from exc
    return absolute(target, user)


async def _upload_body(request: Request, call: Any, target: str, user: str, limit: int) -> str:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise EnvdHttpError(400, f"unsupported Content-Encoding {encoding!r}")
    length = request.headers.get("content-length")
    try:
        if encoding == "identity" and length is not None and length.isdigit():
            return await _write(call, target, user, request.stream(), int(length))
        with tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as spool:
            size = await _spool(_decoded(request.stream(), encoding, limit), spool, limit)
            return await _write(call, target, user, _spooled(spool), size)
    except ClientDisconnect:
        raise EnvdHttpError(400, "the upload ended early") from None
    except ValueError as exc:  # the body was not Content-Length bytes long
        raise EnvdHttpError(400, str(exc)) from None


async def _decoded(chunks: AsyncIterator[bytes], encoding: str, limit: int) -> AsyncIterator[bytes]:
    if encoding == "identity":
        async for chunk in chunks:
            yield chunk
        return
    inflater = zlib.decompressobj(wbits=31)
    try:
        async for chunk in chunks:
            # Bounded output per step: a small "zip bomb" body cannot fill memory.
            data = inflater.decompress(chunk, _CHUNK)
            yield data
            while inflater.unconsumed_tail:
                yield inflater.decompress(inflater.unconsumed_tail, _CHUNK)
        yield inflater.flush()
    except zlib.error as exc:
        raise EnvdHttpError(400, f"the gzip body is corrupt: {exc}") from None
    if not inflater.eof:
        raise EnvdHttpError(400, "the gzip body ended early")


async def _spool(chunks: AsyncIterator[bytes], spool: IO[bytes], limit: int) -> int:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if spool.tell() + len(chunk) > SPOOL_MEMORY:
            await asyncio.to_thread(spool.write, chunk)  # on disk (or about to be)
        else:
            spool.write(chunk)
    spool.seek(0)
    return size


async def _spooled(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while block := await asyncio.to_thread(spool.read, _CHUNK):
        yield block


async def _upload_multipart(
    request: Request, call: Any, path: str | None, user: str, limit: int
) -> list[str]:
    counted = Request(request.scope, _counting(request.receive, limit))
    try:
        form = await counted.form(max_files=MAX_PARTS, max_fields=MAX_PARTS)
    except ClientDisconnect:
        raise EnvdHttpError(400, "the upload ended early") from None
    except EnvdHttpError:
        raise
    except Exception as exc:  # Starlette's MultiPartException, HTTPException: a bad body
        raise EnvdHttpError(400, f"malformed multipart body: {exc}") from None
    try:
        parts = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not parts:
            raise EnvdHttpError(400, "the multipart body has no file part")
        written = []
        for part in parts:
            target = path if path and len(parts) == 1 else part.filename
            target = _checked_path(target)
            part.file.seek(0, os.SEEK_END)
            size = part.file.tell()
            part.file.seek(0)
            written.append(await _write(call, target, user, _spooled(part.file), size))
        return written
    finally:
        await form.close()


def _counting(
    receive: Callable[[], Awaitable[AsgiMessage]], limit: int
) -> Callable[[], Awaitable[AsgiMessage]]:
    """``receive`` that refuses a body past ``limit`` bytes (one without Content-Length)."""
    seen = 0

    async def counted() -> AsgiMessage:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    return counted
