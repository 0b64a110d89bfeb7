"""mkdir, move and remove: each one request, answered once, as the acting user."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat

from kiln.protocol import FileInfo, MkdirRequest, MkdirResponse, MoveRequest, RemoveRequest
from kiln.protocol.messages import parse_mode

from .actor import Actor, actor_for
from .context import GuestContext
from .errors import RequestError
from .files import Names, base_name, describe, make_parents

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
DEFAULT_DIR_MODE = 0o755


def _fail(path: str, exc: OSError) -> RequestError:
    return RequestError(f"{path}: {exc.strerror or exc}")


def _exists_error(path: str) -> RequestError:
    return RequestError(f"{path}: {os.strerror(errno.EEXIST)}")


# ---- mkdir -----------------------------------------------------------------------


async def make_dir(req: MkdirRequest, ctx: GuestContext) -> MkdirResponse:
    actor = actor_for(ctx, req.user)
    path = actor.resolve_clean(req.path)
    mode = parse_mode(req.mode) if req.mode is not None else DEFAULT_DIR_MODE
    return await actor.run(lambda: _make_dir(path, req.parents, mode, actor))


def _make_dir(path: str, parents: bool, mode: int, actor: Actor) -> MkdirResponse:
    try:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise RequestError(f"{path}: {os.strerror(errno.EEXIST)} (not a directory)")
            return MkdirResponse(False, describe(base_name(path), path, Names()))
        if parents:
            make_parents(os.path.dirname(path), actor)
        try:
            os.mkdir(path, 0o700)  # no window in which others may enter it
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return MkdirResponse(False, describe(base_name(path), path, Names()))
        os.chmod(path, mode)  # exactly ``mode``: mkdir's would be cut by the umask
        actor.own(path)
        return MkdirResponse(True, describe(base_name(path), path, Names()))
    except OSError as exc:
        raise _fail(path, exc) from exc


# ---- move ------------------------------------------------------------------------

_renameat2_missing = False


def _rename_noreplace(source: str, destination: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing (atomically: no window
    between a check and the rename). Falls back to check-then-rename on systems
    without renameat2."""
    global _renameat2_missing
    if not _renameat2_missing:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "renameat2", None)
        if func is not None:
            result = func(
                _AT_FDCWD,
                os.fsencode(source),
                _AT_FDCWD,
                os.fsencode(destination),
                _RENAME_NOREPLACE,
            )
            if result == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err), destination)
        _renameat2_missing = True
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), destination)
    os.rename(source, destination)


async def move(req: MoveRequest, ctx: GuestContext) -> FileInfo:
    actor = actor_for(ctx, req.user)
    source = actor.resolve_clean(req.source)
    destination = actor.resolve_clean(req.destination)
    return await actor.run(lambda: _move(source, destination, req.overwrite, actor))


def _move(source: str, destination: str, overwrite: bool, actor: Actor) -> FileInfo:
    try:
        os.lstat(source)
    except OSError as exc:
        raise _fail(source, exc) from exc
    if source == destination:
        return describe(base_name(destination), destination, Names())
    if destination.startswith(source.rstrip("/") + "/"):
        raise RequestError(f"{destination}: cannot move a directory into itself")
    try:
        make_parents(os.path.dirname(destination), actor)
        try:
            if overwrite:
                os.rename(source, destination)
            else:
                _rename_noreplace(source, destination)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Another filesystem (a tmpfs, a volume): copy, then remove the source.
            if os.path.lexists(destination):
                if not overwrite:
                    raise _exists_error(destination) from None
                if os.path.isdir(destination) and not os.path.islink(destination):
                    os.rmdir(destination)  # as rename(2): only an empty directory
                else:
                    os.unlink(destination)
            shutil.move(source, destination)
        return describe(base_name(destination), destination, Names())
    except FileExistsError as exc:
        raise _exists_error(destination) from exc
    except OSError as exc:
        raise _fail(exc.filename or destination, exc) from exc


# ---- remove ----------------------------------------------------------------------


async def remove(req: RemoveRequest, ctx: GuestContext) -> None:
    actor = actor_for(ctx, req.user)
    path = actor.resolve_clean(req.path)
    if path == "/":
        raise RequestError("/: refusing to remove the root directory")
    await actor.run(lambda: _remove(path, req.recursive))


def _rmtree_error(
    func: object, path: str, info: tuple[type[BaseException], BaseException, object]
) -> None:
    # ``onerror`` rather than 3.12's ``onexc``: the guest image's python3 is 3.11.
    if isinstance(info[1], FileNotFoundError):
        return  # removed meanwhile: the goal is reached
    raise info[1]


def _remove(path: str, recursive: bool) -> None:
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                shutil.rmtree(path, onerror=_rmtree_error)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)  # a symlink itself, never its target
    except OSError as exc:
        raise _fail(exc.filename or path, exc) from exc
