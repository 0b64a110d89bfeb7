"""FILE_WATCH: a directory's changes as FILE_EVENT frames, from inotify (via ctypes).

Events are reported the way E2B's WatchDir (fsnotify) reports them: a new or
moved-in entry is ``create``, a content change ``write``, an attribute change
``chmod``, a deleted entry ``remove``, a moved-away one ``rename``. kiln's own
atomic writes (a temporary file renamed over the target) are reported as what
they mean: ``write`` of the target, preceded by ``create`` when it is new; the
temporary file never shows.

Memory stays bounded: the agent reads inotify only after the previous batch of
frames has drained to the host (a slow host leaves events in the kernel's
queue, which drops them past its own limit), and the watch descriptors, the
names known to exist and the pending renames each have a cap.

The watch ends when the host closes the connection (or sends anything, e.g.
KILL), or when the watched directory is deleted (EXIT 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Iterator
from functools import partial
from typing import Final

from kiln.protocol import (
    FileEvent,
    FrameStream,
    FrameType,
    StatusResponse,
    WatchRequest,
    encode_exit,
    encode_frame,
)

from .actor import Actor, actor_for
from .context import GuestContext, recv_frame
from .errors import RequestError
from .files import TEMP_PREFIX

log = logging.getLogger(__name__)

IN_MODIFY: Final = 0x00000002
IN_ATTRIB: Final = 0x00000004
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_DONT_FOLLOW: Final = 0x02000000
IN_ISDIR: Final = 0x40000000
IN_NONBLOCK: Final = 0o4000
IN_CLOEXEC: Final = 0o2000000

WATCH_MASK: Final = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
)
_EVENT: Final = struct.Struct("iIII")
READ_SIZE: Final = 64 * 1024
#: Directories one recursive watch may cover (each costs a kernel watch and a name).
MAX_WATCHES: Final = 8192
#: Names a watch remembers as existing, to tell a new file's atomic write (create +
#: write) from an overwrite (write); past the cap an overwrite is assumed.
MAX_KNOWN: Final = 10_000
#: Renames of a temporary file whose other half has not been read yet.
MAX_PENDING: Final = 64

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), what)


class Inotify:
    """A non-blocking inotify instance."""

    def __init__(self) -> None:
        fd = _c().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _errno_error("inotify_init1")
        self.fd: int = fd

    def add(self, path: str) -> int:
        wd: int = _c().inotify_add_watch(
            self.fd, os.fsencode(path), WATCH_MASK | IN_ONLYDIR | IN_DONT_FOLLOW
        )
        if wd < 0:
            raise _errno_error(path)
        return wd

    def read(self) -> Iterator[tuple[int, int, int, str]]:
        """(wd, mask, cookie, name) of what is queued now."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            raw = data[offset : offset + length].split(b"\0", 1)[0]
            offset += length
            yield wd, mask, cookie, os.fsdecode(raw)

    def close(self) -> None:
        os.close(self.fd)


def _entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return list(it)


class Watch:
    """The state of one watch: pure bookkeeping over inotify's raw events."""

    def __init__(self, ino: Inotify, root: str, recursive: bool, actor: Actor) -> None:
        self.ino = ino
        #: Watches are added as the user (inotify wants read access): a recursive
        #: watch never covers a directory its user may not read.
        self.actor = actor
        self.root = root
        self.recursive = recursive
        self.dirs: dict[int, str] = {}  # wd → path relative to root ("" for root)
        self.known: set[str] = set()
        self.pending: dict[int, str] = {}  # cookie → moved-away temporary file
        self.root_wd = self._add("")
        self.ended = False

    def _add(self, rel: str) -> int:
        path = os.path.join(self.root, rel) if rel else self.root
        wd = self.actor.call(lambda: self.ino.add(path))
        self.dirs[wd] = rel
        return wd

    def _remember(self, rel: str) -> None:
        if len(self.known) < MAX_KNOWN:
            self.known.add(rel)

    def seed(self, rel: str = "") -> None:
        """Note what exists under ``rel`` (and watch its subdirectories if recursive)."""
        todo = [rel]
        while todo:
            current = todo.pop()
            try:
                entries = self.actor.call(partial(_entries, os.path.join(self.root, current)))
            except OSError:
                continue
            for entry in entries:
                name = os.path.join(current, entry.name) if current else entry.name
                self._remember(name)
                if (
                    self.recursive
                    and entry.is_dir(follow_symlinks=False)
                    and len(self.dirs) < MAX_WATCHES
                ):
                    with contextlib.suppress(OSError):
                        self._add(name)
                        todo.append(name)

    def translate(self, wd: int, mask: int, cookie: int, name: str) -> list[FileEvent]:
        if mask & IN_Q_OVERFLOW:
            log.warning("watch of %s: the kernel's event queue overflowed", self.root)
            return []
        if mask & IN_IGNORED:
            self.dirs.pop(wd, None)
            if wd == self.root_wd:
                self.ended = True
            return []
        base = self.dirs.get(wd)
        if base is None:
            return []
        if mask & IN_DELETE_SELF:
            if wd == self.root_wd:
                self.ended = True
            return []
        if not name:
            return []
        rel = os.path.join(base, name) if base else name
        is_dir = bool(mask & IN_ISDIR)
        if name.startswith(TEMP_PREFIX):
            if mask & IN_MOVED_FROM and len(self.pending) < MAX_PENDING:
                self.pending[cookie] = rel
            return []
        if mask & IN_MOVED_TO and self.pending.pop(cookie, None) is not None:
            events = [] if rel in self.known else [FileEvent(rel, "create")]
            self._remember(rel)
            return [*events, FileEvent(rel, "write")]
        if mask & (IN_CREATE | IN_MOVED_TO):
            self._remember(rel)
            if is_dir and self.recursive and len(self.dirs) < MAX_WATCHES:
                with contextlib.suppress(OSError):
                    self._add(rel)
                    self.seed(rel)
            return [FileEvent(rel, "create")]
        if mask & IN_MODIFY:
            return [FileEvent(rel, "write")]
        if mask & IN_ATTRIB:
            return [FileEvent(rel, "chmod")]
        if mask & IN_DELETE:
            self.known.discard(rel)
            return [FileEvent(rel, "remove")]
        if mask & IN_MOVED_FROM:
            self.known.discard(rel)
            return [FileEvent(rel, "rename")]
        return []

    def events(self) -> list[FileEvent]:
        """Everything queued now, with runs of the same event on one name merged."""
        out: list[FileEvent] = []
        for raw in self.ino.read():
            for event in self.translate(*raw):
                if not out or out[-1] != event:
                    out.append(event)
        return out


async def watch_dir(conn: FrameStream, req: WatchRequest, ctx: GuestContext) -> None:
    actor = actor_for(ctx, req.user)
    root = actor.resolve_clean(req.path)

    def check() -> None:
        # As the user: the directory must exist, be one, and be readable by them.
        os.close(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    try:
        await actor.run(check)
        ino = Inotify()
    except OSError as exc:
        raise RequestError(f"{root}: {exc.strerror or exc}") from exc
    try:
        try:
            watch = Watch(ino, root, req.recursive, actor)
        except OSError as exc:
            raise RequestError(f"{root}: {exc.strerror or exc}") from exc
        await asyncio.to_thread(watch.seed)
        ctx.touch()
        await conn.send(FrameType.FILE_WATCH_RESP, StatusResponse("ok").to_payload())
        ctx.watches += 1
        try:
            await _pump(conn, watch)
        finally:
            ctx.watches -= 1
            ctx.touch()
    finally:
        ino.close()


async def _pump(conn: FrameStream, watch: Watch) -> None:
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(watch.ino.fd, ready.set)
    host = asyncio.ensure_future(recv_frame(conn))  # anything, or EOF, ends the watch
    try:
        while True:
            waiter = asyncio.ensure_future(ready.wait())
            done, _ = await asyncio.wait({host, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if host in done:
                waiter.cancel()
                return
            ready.clear()
            frames = [
                encode_frame(FrameType.FILE_EVENT, event.to_payload()) for event in watch.events()
            ]
            if watch.ended:
                frames.append(encode_frame(FrameType.EXIT, encode_exit(0)))
            if frames:
                conn.writer.writelines(frames)
                await conn.writer.drain()  # a slow host holds back our reads, not our memory
            if watch.ended:
                return
    finally:
        loop.remove_reader(watch.ino.fd)
        if not host.done():
            host.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await host  # also retrieves its exception (a reset connection)
