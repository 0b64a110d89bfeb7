"""File operations: read (with line/byte truncation), atomic write, stat, ls."""

from __future__ import annotations

import contextlib
import grp
import heapq
import os
import pwd
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from kiln.protocol import (
    CHUNK_SIZE,
    LS_LIMIT,
    MAX_PAYLOAD,
    FileInfo,
    FileListing,
    FileReadRequest,
    FileReadResponse,
    FileWriteRequest,
    FrameStream,
    FrameType,
    PathRequest,
    StatusResponse,
    encode_exit,
    encode_frame,
    format_mode,
    parse_mode,
)

from .actor import Actor, actor_for
from .context import GuestContext, recv_frame
from .errors import RequestError

TEMP_PREFIX = ".kiln-tmp-"
READ_BLOCK = CHUNK_SIZE
READ_BATCH = 4 * CHUNK_SIZE


def _fail(path: str, exc: OSError) -> RequestError:
    return RequestError(f"{path}: {exc.strerror or exc}")


# ---- read ------------------------------------------------------------------------


def truncate_blocks(
    blocks: Iterator[bytes], *, offset: int = 0, limit: int = 0, max_bytes: int = 0
) -> Iterator[bytes]:
    """The bytes of ``blocks`` from 1-based line ``offset``, at most ``limit`` lines
    and ``max_bytes`` bytes (0 = no bound); whichever bound is hit first ends it.

    A line is counted with its newline; a last line without one still counts.
    """
    skip = max(offset - 1, 0)
    lines_left = limit
    bytes_left = max_bytes
    for raw in blocks:
        block = raw
        if skip:
            newlines = block.count(b"\n")
            if newlines < skip:
                skip -= newlines
                continue
            block = block[_past_newlines(block, skip) :]
            skip = 0
            if not block:
                continue
        last = False
        if limit:
            newlines = block.count(b"\n")
            if newlines >= lines_left:
                block = block[: _past_newlines(block, lines_left)]
                last = True
            else:
                lines_left -= newlines
        if max_bytes:
            if len(block) >= bytes_left:
                block = block[:bytes_left]
                last = True
            else:
                bytes_left -= len(block)
        if block:
            yield block
        if last:
            return


def _past_newlines(block: bytes, n: int) -> int:
    """The index just past the ``n``-th newline of ``block`` (which has at least ``n``)."""
    pos = -1
    for _ in range(n):
        pos = block.index(b"\n", pos + 1)
    return pos + 1


def _read_blocks(fd: int) -> Iterator[bytes]:
    while block := os.read(fd, READ_BLOCK):
        yield block


async def read_file(conn: FrameStream, req: FileReadRequest, ctx: GuestContext) -> None:
    actor = actor_for(ctx, req.user)
    path = actor.resolve(req.path)
    try:
        # O_NONBLOCK: opening a FIFO must not hang the agent (it is refused below).
        # Only the open needs the user's identity: the fd then reads as anyone.
        fd = actor.call(lambda: os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as exc:
        raise _fail(path, exc) from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise RequestError(f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(f"{path}: not a regular file")
        ctx.touch()
        # Frames go out in batches of up to READ_BATCH bytes: a small file's
        # header, content and EXIT leave in one segment (under TCG every packet
        # costs the guest a virtio exit and the host a wakeup).
        batch = [
            encode_frame(
                FrameType.FILE_READ_RESP,
                FileReadResponse(size=st.st_size, mode=format_mode(st.st_mode)).to_payload(),
            )
        ]
        batched = len(batch[0])
        blocks = truncate_blocks(
            _read_blocks(fd), offset=req.offset, limit=req.limit, max_bytes=req.max_bytes
        )
        try:
            for block in blocks:
                batch.append(encode_frame(FrameType.STDOUT, block))
                batched += len(block)
                if batched >= READ_BATCH:
                    conn.writer.writelines(batch)
                    batch.clear()
                    batched = 0
                    await conn.writer.drain()  # raises once the host has closed: the read stops
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                raise
            raise _fail(path, exc) from exc
        batch.append(encode_frame(FrameType.EXIT, encode_exit(0)))
        conn.writer.writelines(batch)
        await conn.writer.drain()
    finally:
        os.close(fd)


# ---- write -----------------------------------------------------------------------


def make_parents(directory: str, actor: Actor) -> None:
    """``mkdir -p``; directories we create belong to the acting (or sandbox) user."""
    missing = []
    current = directory
    while current and not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            continue
        actor.own(path)


@dataclass(frozen=True, slots=True)
class _PendingWrite:
    fd: int
    temp: str
    target: str
    mode: int
    #: (uid, gid) of the file being replaced: it keeps its owner. None: a new file.
    owner: tuple[int, int] | None


def _open_temp(path: str, mode_text: str | None, actor: Actor) -> _PendingWrite:
    """Checks, parent directories and the temporary file of a write."""
    target = os.path.realpath(path) if os.path.islink(path) else path  # write through links
    directory, name = os.path.split(target)
    try:
        st: os.stat_result | None = os.stat(target)
    except OSError:
        st = None
    if not name or (st is not None and stat.S_ISDIR(st.st_mode)):
        raise RequestError(f"{target}: is a directory")
    if mode_text is not None:
        mode = parse_mode(mode_text)
    else:
        mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
    if st is not None and actor.creds is not None and stat.S_ISREG(st.st_mode):
        # Replacing by rename needs only the directory's permission; a user must
        # also be allowed to write the file itself, as with an in-place write.
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            raise _fail(target, exc) from exc
    try:
        make_parents(directory, actor)
        temp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _fail(target, exc) from exc
    owner = (st.st_uid, st.st_gid) if st is not None else None
    return _PendingWrite(fd, temp, target, mode, owner)


def _finish_write(pending: _PendingWrite, actor: Actor) -> None:
    """Mode, owner, (fsync,) rename, (fsync the directory). Runs in a worker thread:
    fsync may take a while. The rename is what makes the write atomic for readers;
    the fsyncs make it durable, for a host that snapshots the disk right after."""
    fd = pending.fd
    durable = actor.ctx.settings.durable
    try:
        if durable:
            os.fsync(fd)
        os.fchmod(fd, pending.mode)
        actor.own(fd, pending.owner)
    finally:
        os.close(fd)
    os.rename(pending.temp, pending.target)
    if durable:
        directory = os.path.dirname(pending.target) or "."
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


async def write_file(conn: FrameStream, req: FileWriteRequest, ctx: GuestContext) -> None:
    actor = actor_for(ctx, req.user)
    path = actor.resolve(req.path)
    pending = actor.call(lambda: _open_temp(path, req.mode, actor))
    fd, temp, target = pending.fd, pending.temp, pending.target
    ctx.touch()
    fd_open = True
    try:
        remaining = req.size
        while remaining > 0:
            frame = await recv_frame(conn)
            if frame is None:
                raise ConnectionResetError("host closed the connection mid-write")
            if frame.type != FrameType.STDIN:
                raise RequestError(f"unexpected {FrameType(frame.type).name} frame during write")
            data = frame.payload
            if not data:
                raise RequestError(f"stdin closed after {req.size - remaining} of {req.size} bytes")
            if len(data) > remaining:
                raise RequestError(f"more than the announced {req.size} bytes")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            remaining -= len(data)
        fd_open = False
        if ctx.settings.durable or actor.creds is not None:
            await actor.run(lambda: _finish_write(pending, actor))
        else:
            _finish_write(pending, actor)  # no fsync: nothing here can block for long
    except BaseException as exc:
        if fd_open:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            raise _fail(target, exc) from exc
        raise
    await conn.send(FrameType.FILE_WRITE_RESP, StatusResponse("ok").to_payload())


# ---- stat / ls -------------------------------------------------------------------


class Names:
    """uid/gid → name, looked up once per request (the databases may change between)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            self._users[uid] = name
        return name

    def group(self, gid: int) -> str:
        name = self._groups.get(gid)
        if name is None:
            try:
                name = grp.getgrgid(gid).gr_name
            except KeyError:
                name = str(gid)
            self._groups[gid] = name
        return name


def _type_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def describe(
    name: str,
    path: str,
    names: Names | None,
    *,
    with_path: bool = True,
    lst: os.stat_result | None = None,
) -> FileInfo:
    """FileInfo of ``path``; with ``names``, every extension field. A symlink is
    described by its target (``symlink`` true, ``target`` set); a dangling one by
    itself (type ``symlink``). Raises OSError when ``path`` does not exist."""
    if lst is None:
        lst = os.lstat(path)
    st, target, is_link = lst, None, stat.S_ISLNK(lst.st_mode)
    if is_link:
        with contextlib.suppress(OSError):
            st = os.stat(path)
    if names is None:
        return FileInfo(
            name=name,
            size=st.st_size,
            mode=format_mode(st.st_mode),
            is_dir=stat.S_ISDIR(st.st_mode),
            mtime=st.st_mtime,
            path=path if with_path else None,
        )
    if is_link:
        target = os.path.realpath(path)
    return FileInfo(
        name=name,
        size=st.st_size,
        mode=format_mode(st.st_mode),
        is_dir=stat.S_ISDIR(st.st_mode),
        mtime=st.st_mtime,
        path=path if with_path else None,
        type=_type_of(st.st_mode),
        symlink=is_link,
        target=target,
        uid=st.st_uid,
        gid=st.st_gid,
        owner=names.user(st.st_uid),
        group=names.group(st.st_gid),
        permissions=stat.filemode(st.st_mode),
    )


def base_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or "/"


def stat_path(req: PathRequest, ctx: GuestContext) -> FileInfo:
    actor = actor_for(ctx, req.user)
    path = actor.resolve(req.path)

    def run() -> FileInfo:
        os.stat(path)  # a dangling symlink is "not found", as it always was
        return describe(base_name(path), path, Names() if req.details else None)

    try:
        return actor.call(run)
    except OSError as exc:
        raise _fail(path, exc) from exc


def list_dir(req: PathRequest, ctx: GuestContext) -> bytes:
    """The FILE_LS_RESP payload: sorted, capped at LS_LIMIT, and always within one frame."""
    actor = actor_for(ctx, req.user)
    path = actor.resolve(req.path)
    try:
        infos, total = actor.call(lambda: _collect(path, req.depth, req.details))
    except OSError as exc:
        raise _fail(path, exc) from exc
    truncated = total > len(infos)
    while True:
        payload = FileListing(tuple(infos), truncated, total).to_payload()
        if len(payload) <= MAX_PAYLOAD:
            return payload
        # Long names: 10,000 entries may not fit in one frame; cut further.
        keep = int(len(infos) * MAX_PAYLOAD / len(payload) * 0.95)
        infos = infos[:keep]
        truncated = True


def _sorted_entries(path: str, cap: int) -> tuple[list[os.DirEntry[str]], int]:
    """The first ``cap`` entries of a directory by name, and how many it has, without
    holding a huge directory in memory."""
    total = 0

    def counted(entries: Iterator[os.DirEntry[str]]) -> Iterator[os.DirEntry[str]]:
        nonlocal total
        for entry in entries:
            total += 1
            yield entry

    with os.scandir(path) as it:
        entries = heapq.nsmallest(cap, counted(it), key=lambda e: e.name)
    entries.reverse()  # consumed with pop()
    return entries, total


def _collect(path: str, depth: int | None, details: bool) -> tuple[list[FileInfo], int]:
    """Entries (depth-first, each directory's sorted by name) down to ``depth`` levels,
    at most LS_LIMIT of them, and the number seen. Symlinked directories are listed,
    not entered. Without ``depth``: one level, the original answer (no ``path``)."""
    names = Names() if details else None
    infos: list[FileInfo] = []
    entries, total = _sorted_entries(path, LS_LIMIT)
    stack: list[tuple[int, list[os.DirEntry[str]]]] = [(1, entries)]
    while stack:
        level, pending = stack[-1]
        if not pending:
            stack.pop()
            continue
        entry = pending.pop()
        if len(infos) >= LS_LIMIT:
            continue
        try:
            info = describe(
                entry.name,
                entry.path,
                names,
                with_path=depth is not None,
                lst=entry.stat(follow_symlinks=False),
            )
        except OSError:
            total -= 1  # removed while we list
            continue
        infos.append(info)
        entered = info.is_dir and not entry.is_symlink()
        if depth is not None and level < depth and entered:
            try:
                children, count = _sorted_entries(entry.path, LS_LIMIT - len(infos))
            except OSError:
                continue  # unreadable or gone: listed, not entered
            total += count
            stack.append((level + 1, children))
    return infos, total
