"""Files and directory trees of a sandbox as tar streams (``kiln cp``, like Docker's
archive API).

``GET /sandboxes/{id}/archive?path=`` streams a tar of ``path`` (its top member
is the path's base name; a symlink is archived as the link itself);
``PUT /sandboxes/{id}/archive?path=`` extracts the tar in the request body into
the existing directory ``path``.

Design: both run GNU ``tar`` in the sandbox through one streamed exec, as root,
rather than walking the tree with the agent's file operations. One process and
one connection carry the whole tree with the agent's flow control, whatever the
number of files (the file operations cost a connection per file, and the agent
has no operation that makes a symlink); ``tar`` keeps modes, symlinks and empty
directories by itself; and GNU tar is Essential in Debian, so it is in every
image kiln builds, and runs the same in QEMU guests and in runc and runsc
containers (tests/cli/test_vm.py, tests/server/vm/test_engines.py). An image
without GNU tar (busybox's lacks the options used here) gets a 409 quoting
tar's complaint rather than a partial copy. Root, because the files routes act as
the agent (root) too: any path is readable and writable, and what is created is
given to the sandbox user. Here the daemon gives it by rewriting each member's
owner to the sandbox user's uid/gid while the stream passes (``tar`` extracts as
root with ``--same-owner --numeric-owner``; ``--no-overwrite-dir`` leaves the
owner and mode of directories that already exist alone).

An upload passes :class:`~kiln.archive.TarScanner` on its way in, so a member
with an absolute name, a ``..`` or a symlink out of the destination is refused
(400) before it reaches ``tar`` (members before it may have been extracted).
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.requests import ClientDisconnect

from kiln.agent_client import AgentClient, ExecProcess
from kiln.agent_client.exec import Exit, Stderr, Stdout
from kiln.api.responses import ArchiveExtracted
from kiln.archive import TarScanner, UnsafeArchive
from kiln.protocol import ROOT_USER

from ..errors import BadGateway, BadRequest, ConflictError
from ..streaming import LiveStream, keep_active
from .deps import AppServices, CurrentUser

router = APIRouter(tags=["files"])
log = logging.getLogger(__name__)

PathParam = Annotated[str, Query(min_length=1, max_length=4096, description="path in the sandbox")]
#: tar's complaints kept for an error message.
STDERR_CAP = 16 * 1024
#: tar's status for "some files changed while being read": the archive is still whole.
TAR_CHANGED = 1
#: What the shell says when tar is missing.
NOT_INSTALLED = 127


def _split(path: str) -> tuple[str, str]:
    """``(directory, base name)`` of a request path for ``tar -C DIR NAME``."""
    if "\x00" in path:
        raise BadRequest("path must not contain NUL bytes")
    clean = posixpath.normpath(path)
    if clean in ("/", ".") or posixpath.basename(clean) == "..":
        return clean, "."
    return posixpath.dirname(clean) or ".", posixpath.basename(clean)


def _tar_failed(code: int, stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip()
    if code == NOT_INSTALLED:
        return "tar is not installed in the sandbox"
    return f"tar exited with status {code}: {text[-2000:] or 'no message'}"


@router.get(
    "/sandboxes/{sandbox}/archive",
    response_class=Response,
    responses={
        200: {
            "description": "A tar stream of the path",
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def get_archive(
    sandbox: str, user: CurrentUser, services: AppServices, path: PathParam
) -> Response:
    """A tar stream of ``path`` (a file, a symlink or a directory tree), with
    ``X-File-Size``, ``X-File-Mode`` and ``X-File-IsDir`` of the path (as ``HEAD
    /files``) and ``X-Archive-Root``, the name of its top member. 404 when the
    path does not exist."""
    parent, name = _split(path)
    sb, client = await services.sandboxes.agent(user, sandbox)
    info = await client.stat(path)
    proc = client.exec_stream(
        ["tar", "-c", "-f", "-", "-C", parent, "--", name], stdin=b"", user=ROOT_USER
    )
    await proc.__aenter__()
    try:
        stderr = bytearray()
        # Read up to the first output so that a tar that cannot start is a clean error.
        first = b""
        async for event in proc:
            if isinstance(event, Stdout):
                first = event.data
                break
            if isinstance(event, Stderr):
                stderr += event.data[: STDERR_CAP - len(stderr)]
            elif isinstance(event, Exit) and event.code not in (0, TAR_CHANGED):
                raise ConflictError(_tar_failed(event.code, bytes(stderr)))
        headers = {
            "X-File-Size": str(info.size),
            "X-File-Mode": info.mode,
            "X-File-IsDir": "true" if info.is_dir else "false",
            "X-Archive-Root": name,
        }
        touch = _toucher(services, sb.id)
        return LiveStream(
            _relay(proc, first, stderr, touch),
            media_type="application/x-tar",
            headers=headers,
            on_close=_closer(proc),
        )
    except BaseException as exc:
        await proc.__aexit__(type(exc), exc, exc.__traceback__)
        raise


def _toucher(services: AppServices, sandbox_id: str) -> Callable[[], None]:
    def touch() -> None:
        services.sandboxes.touch(sandbox_id)

    return touch


def _closer(proc: ExecProcess) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        await proc.__aexit__(None, None, None)  # kills tar if it is still running

    return close


async def _relay(
    proc: ExecProcess, first: bytes, stderr: bytearray, touch: Callable[[], None]
) -> AsyncGenerator[bytes, None]:
    async with keep_active(touch):
        if first:
            yield first
        async for event in proc:
            if isinstance(event, Stdout):
                yield event.data
            elif isinstance(event, Stderr):
                stderr += event.data[: STDERR_CAP - len(stderr)]
            elif event.code not in (0, TAR_CHANGED):
                # The status line went out already: cutting the stream short is the
                # only way left to tell the client the archive is incomplete.
                raise BadGateway(_tar_failed(event.code, bytes(stderr)))
            elif event.code == TAR_CHANGED:
                log.info("archive of a changing tree: %s", bytes(stderr).decode(errors="replace"))


async def _owner(client: AgentClient) -> tuple[int, int]:
    """uid and gid of the sandbox user (the agent's default user for exec)."""
    result = await client.exec(["sh", "-c", "id -u && id -g"], timeout=30)
    try:
        uid, gid = (int(line) for line in result.stdout.split())
        return uid, gid
    except ValueError:
        raise BadGateway(
            f"cannot tell the sandbox user's uid/gid: {result.stderr.decode(errors='replace')}"
        ) from None


@router.put("/sandboxes/{sandbox}/archive", response_model=ArchiveExtracted)
async def put_archive(
    *,
    sandbox: str,
    request: Request,
    user: CurrentUser,
    services: AppServices,
    path: PathParam,
) -> ArchiveExtracted:
    """Extract the tar stream in the body into the directory ``path`` (which must
    exist: 404 otherwise, 400 if it is not a directory). Members get the sandbox
    user as owner and keep their modes; symlinks stay symlinks. An archive with
    an absolute name, a ``..``, a symlink pointing out of ``path``, a device or a
    sparse file is refused (400). ``{"path", "members"}``."""
    _split(path)
    sb, client = await services.sandboxes.agent(user, sandbox)
    info = await client.stat(path)
    if not info.is_dir:
        raise BadRequest(f"{path} is not a directory")
    uid, gid = await _owner(client)
    scanner = TarScanner(uid, gid)
    argv = [
        "tar", "-x", "-f", "-", "-C", path,
        "--same-owner", "--numeric-owner", "--no-overwrite-dir", "--delay-directory-restore",
    ]  # fmt: skip
    stderr = bytearray()
    code: int | None = None
    async with (
        keep_active(_toucher(services, sb.id)),
        client.exec_stream(argv, user=ROOT_USER) as proc,
    ):

        async def collect() -> None:
            nonlocal code, stderr
            async for event in proc:
                if isinstance(event, Stderr):
                    stderr += event.data[: STDERR_CAP - len(stderr)]
                elif isinstance(event, Exit):
                    code = event.code

        reader = asyncio.create_task(collect())
        try:
            try:
                async for chunk in request.stream():
                    if reader.done():
                        break  # tar stopped early: its status says why
                    passed = scanner.feed(chunk)
                    if passed:
                        await proc.send_stdin(passed)
                if not reader.done():
                    await proc.send_stdin(scanner.close())
                    await proc.close_stdin()
            except ClientDisconnect:
                raise BadRequest("the upload ended before the archive did") from None
            except UnsafeArchive as exc:
                raise BadRequest(f"archive refused: {exc}") from None
            await reader
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
    if code != 0:
        raise ConflictError(_tar_failed(code if code is not None else -1, bytes(stderr)))
    return ArchiveExtracted(path=path, members=scanner.members)
