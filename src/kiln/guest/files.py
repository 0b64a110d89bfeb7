"""File operations: read (with line/byte truncation), atomic write, stat, ls."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
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
    path = ctx.resolve_path(req.path)
    try:
        # O_NONBLOCK: opening a FIFO must not hang the agent (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
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


def _make_parents(directory: str, ctx: GuestContext) -> None:
    """``mkdir -p``; directories we create belong to the sandbox user."""
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
        ctx.give_to_user(path)


@dataclass(frozen=True, slots=True)
class _PendingWrite:
    fd: int
    temp: str
    target: str
    mode: int
    #: (uid, gid) of the file being replaced: it keeps its owner. None: a new file.
    owner: tuple[int, int] | None


def _open_temp(path: str, mode_text: str | None, ctx: GuestContext) -> _PendingWrite:
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
    try:
        _make_parents(directory, ctx)
        temp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _fail(target, exc) from exc
    owner = (st.st_uid, st.st_gid) if st is not None else None
    return _PendingWrite(fd, temp, target, mode, owner)


def _finish_write(pending: _PendingWrite, ctx: GuestContext) -> None:
    """Mode, owner, (fsync,) rename, (fsync the directory). Runs in a worker thread:
    fsync may take a while. The rename is what makes the write atomic for readers;
    the fsyncs make it durable, for a host that snapshots the disk right after."""
    fd = pending.fd
    durable = ctx.settings.durable
    try:
        if durable:
            os.fsync(fd)
        os.fchmod(fd, pending.mode)
        ctx.give_to_user(fd, pending.owner)
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
    pending = _open_temp(ctx.resolve_path(req.path), req.mode, ctx)
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
        if ctx.settings.durable:
            await asyncio.to_thread(_finish_write, pending, ctx)
        else:
            _finish_write(pending, ctx)  # no fsync: nothing here can block for long
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


def _info(name: str, st: os.stat_result, path: str | None = None) -> FileInfo:
    return FileInfo(
        name=name,
        size=st.st_size,
        mode=format_mode(st.st_mode),
        is_dir=stat.S_ISDIR(st.st_mode),
        mtime=st.st_mtime,
        path=path,
    )


def stat_path(req: PathRequest, ctx: GuestContext) -> FileInfo:
    path = ctx.resolve_path(req.path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _fail(path, exc) from exc
    name = os.path.basename(os.path.normpath(path)) or "/"
    return _info(name, st, path)


def list_dir(req: PathRequest, ctx: GuestContext) -> bytes:
    """The FILE_LS_RESP payload: sorted, capped at LS_LIMIT, and always within one frame."""
    path = ctx.resolve_path(req.path)
    total = 0

    def counted(entries: Iterator[os.DirEntry[str]]) -> Iterator[os.DirEntry[str]]:
        nonlocal total
        for entry in entries:
            total += 1
            yield entry

    try:
        with os.scandir(path) as it:
            # The first LS_LIMIT names, sorted, without holding a huge directory in memory.
            entries = heapq.nsmallest(LS_LIMIT, counted(it), key=lambda e: e.name)
    except OSError as exc:
        raise _fail(path, exc) from exc
    infos = []
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:
            try:
                st = entry.stat(follow_symlinks=False)  # a dangling symlink
            except OSError:
                continue  # removed while we list
        infos.append(_info(entry.name, st))
    truncated = total > LS_LIMIT
    while True:
        payload = FileListing(tuple(infos), truncated, total).to_payload()
        if len(payload) <= MAX_PAYLOAD:
            return payload
        # Long names: 10,000 entries may not fit in one frame; cut further.
        keep = int(len(infos) * MAX_PAYLOAD / len(payload) * 0.95)
        infos = infos[:keep]
        truncated = True
