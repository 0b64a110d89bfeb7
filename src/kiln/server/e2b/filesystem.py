"""envd's ``filesystem.Filesystem`` service on kiln's agent.

Every call acts as the SDK's user (``Authorization: Basic``; the sandbox's
default account when it names none, or root): the agent performs it with that
user's filesystem identity, so permissions are the kernel's and what it creates
is theirs; relative paths and ``~`` start at that user's home, as in envd.

Errors become the Connect codes the SDK turns into its exceptions: a missing
path ``not_found`` (``FileNotFoundException``, and ``exists()`` False), an
existing directory for MakeDir ``already_exists`` (``make_dir()`` False), a
path of the wrong kind ``invalid_argument``, a refusal ``permission_denied``.

Watching, two ways as the SDK does it: WatchDir streams events (after a
``start`` message, with ``keepalive`` messages at the interval the SDK asks
for); CreateWatcher / GetWatcherEvents / RemoveWatcher keep a watch in the
daemon and hand out what it saw since the last call (:class:`Watchers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from kiln.agent_client import (
    AgentError,
    DirWatch,
    RemoteError,
    RemoteExists,
    RemoteNotADirectory,
    RemoteNotFound,
    RemotePermissionDenied,
)
from kiln.protocol import MAX_LS_DEPTH, ROOT_USER, FileEvent, FileInfo

from .connect import Code, ConnectError, Message, Service, connect_error
from .envd import EnvdCall
from .messages import boolean, invalid, string, uint32
from .users import default_user

service: Service[EnvdCall] = Service("filesystem.Filesystem")

_TYPES: Final = {
    "file": "FILE_TYPE_FILE",
    "dir": "FILE_TYPE_DIRECTORY",
    "symlink": "FILE_TYPE_SYMLINK",
}
_EVENTS: Final = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
}
KEEPALIVE_HEADER: Final = "keepalive-ping-interval"
#: Keepalive interval when the SDK names none (its own default is 50 s).
DEFAULT_KEEPALIVE_S: Final = 50.0


def acting_user(call: EnvdCall) -> str:
    """The account file operations of this call act as."""
    return ROOT_USER if call.user == ROOT_USER else default_user(call.sandbox)


def fs_error(exc: BaseException) -> BaseException:
    """The Connect error for what an agent file operation raised."""
    match exc:
        case RemoteNotFound():
            return ConnectError(Code.NOT_FOUND, exc.message)
        case RemotePermissionDenied():
            return ConnectError(Code.PERMISSION_DENIED, exc.message)
        case RemoteExists():
            return ConnectError(Code.ALREADY_EXISTS, exc.message)
        case RemoteNotADirectory():
            return ConnectError(Code.INVALID_ARGUMENT, exc.message)
        case RemoteError():
            return ConnectError(Code.INVALID_ARGUMENT, exc.message)
    return connect_error(exc) or exc


def _required_path(request: Message, name: str = "path") -> str:
    value = string(request, name)
    if not value:
        raise invalid(f"field {name!r} is required")
    if "\x00" in value:
        raise invalid(f"field {name!r} must not contain NUL bytes")
    return value


def _timestamp(unix: float) -> str:
    """RFC 3339 in UTC, as proto3 JSON writes a google.protobuf.Timestamp."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_info(info: FileInfo) -> Message:
    """A FileInfo (with details and path) as envd's EntryInfo."""
    out: Message = {
        "name": info.name,
        "type": _TYPES.get(info.type or "", "FILE_TYPE_UNSPECIFIED"),
        "path": info.path or "",
        "size": str(info.size),
        "mode": int(info.mode, 8) & 0o777,
        "permissions": info.permissions or "",
        "owner": info.owner or "",
        "group": info.group or "",
        "modifiedTime": _timestamp(info.mtime),
    }
    if info.symlink:
        out["isSymlink"] = True
        if info.target is not None:
            out["symlinkTarget"] = info.target
    return out


@service.unary("Stat")
async def stat(call: EnvdCall, request: Message) -> Message:
    path = _required_path(request)
    try:
        info = await call.agent.stat(path, user=acting_user(call), details=True)
    except AgentError as exc:
        raise fs_error(exc) from exc
    return {"entry": entry_info(info)}


@service.unary("ListDir")
async def list_dir(call: EnvdCall, request: Message) -> Message:
    path = _required_path(request)
    depth = uint32(request, "depth") or 1  # 0 (unset) lists one level, as envd does
    if depth > MAX_LS_DEPTH:
        raise invalid(f"depth must be at most {MAX_LS_DEPTH}")
    try:
        listing = await call.agent.ls(path, depth=depth, user=acting_user(call), details=True)
    except AgentError as exc:  # a file: "Not a directory", invalid_argument
        raise fs_error(exc) from exc
    return {"entries": [entry_info(e) for e in listing.entries]}


@service.unary("MakeDir")
async def make_dir(call: EnvdCall, request: Message) -> Message:
    path = _required_path(request)
    try:
        made = await call.agent.mkdir(path, parents=True, user=acting_user(call))
    except RemoteExists as exc:  # a file is in the way: not "already exists" (→ False)
        raise ConnectError(Code.INVALID_ARGUMENT, f"{exc.message}: not a directory") from exc
    except AgentError as exc:
        raise fs_error(exc) from exc
    if not made.created:
        raise ConnectError(Code.ALREADY_EXISTS, f"directory {made.info.path} already exists")
    return {"entry": entry_info(made.info)}  # the agent's answer has the details


@service.unary("Move")
async def move(call: EnvdCall, request: Message) -> Message:
    source = _required_path(request, "source")
    destination = _required_path(request, "destination")
    user = acting_user(call)
    try:
        # envd renames over an existing destination (rename(2)), and so does this.
        moved = await call.agent.move(source, destination, overwrite=True, user=user)
    except AgentError as exc:
        raise fs_error(exc) from exc
    return {"entry": entry_info(moved)}


@service.unary("Remove")
async def remove(call: EnvdCall, request: Message) -> Message:
    path = _required_path(request)
    try:
        await call.agent.remove(path, recursive=True, user=acting_user(call))
    except RemoteNotFound:
        pass  # envd removes with RemoveAll: a missing path is already removed
    except AgentError as exc:
        raise fs_error(exc) from exc
    return {}


# ---- watching -------------------------------------------------------------------


def _event(event: FileEvent) -> Message:
    return {"name": event.name, "type": _EVENTS[event.type]}


def _watch_options(call: EnvdCall, request: Message) -> tuple[str, bool]:
    path = _required_path(request)
    if boolean(request, "includeEntry"):
        raise ConnectError(Code.UNIMPLEMENTED, "watch events with entry info are not supported")
    return path, bool(boolean(request, "recursive"))


async def _open_watch(call: EnvdCall, path: str, recursive: bool) -> DirWatch:
    watch = call.agent.watch_dir(path, recursive=recursive, user=acting_user(call))
    try:
        await watch.__aenter__()
    except AgentError as exc:
        raise fs_error(exc) from exc
    return watch


def _keepalive_interval(call: EnvdCall) -> float:
    raw = call.headers.get(KEEPALIVE_HEADER)
    try:
        value = float(raw) if raw is not None else DEFAULT_KEEPALIVE_S
    except ValueError:
        value = DEFAULT_KEEPALIVE_S
    return min(max(value, 1.0), 3600.0)


@service.server_stream("WatchDir")
async def watch_dir(call: EnvdCall, request: Message) -> AsyncIterator[Message]:
    path, recursive = _watch_options(call, request)
    watch = await _open_watch(call, path, recursive)
    interval = _keepalive_interval(call)
    pending: asyncio.Future[FileEvent] | None = None
    try:
        yield {"start": {}}
        events = aiter(watch)
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield {"keepalive": {}}
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return  # the directory is gone
            except AgentError as exc:
                raise fs_error(exc) from exc
            finally:
                if pending.done():
                    pending = None
            call.touch()
            yield {"filesystem": _event(event)}
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        watch.close()


#: Events one watcher keeps between two GetWatcherEvents (the oldest go first).
MAX_EVENTS: Final = 10_000
#: Watchers one sandbox may have.
MAX_WATCHERS: Final = 64
#: A watcher nobody asked for events for this long is dropped.
WATCHER_IDLE_S: Final = 600.0
#: ... and one whose watch has ended, after this long.
ENDED_KEPT_S: Final = 60.0


@dataclass
class Watcher:
    sandbox_id: str
    watch: DirWatch
    events: deque[Message] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    error: BaseException | None = None
    ended: bool = False
    last_used: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None

    async def pump(self) -> None:
        try:
            async for event in self.watch:
                self.events.append(_event(event))
        except AgentError as exc:
            self.error = fs_error(exc)
        finally:
            self.ended = True
            self.watch.close()


class Watchers:
    """The daemon's non-streaming watches: id → a task filling a bounded buffer.

    Each watcher's task is owned here and ends with RemoveWatcher, with its
    sandbox's agent connection, or after :data:`WATCHER_IDLE_S` without a
    GetWatcherEvents (checked whenever watchers are used)."""

    def __init__(self) -> None:
        self._watchers: dict[str, Watcher] = {}

    def __len__(self) -> int:
        return len(self._watchers)

    async def create(self, call: EnvdCall, path: str, recursive: bool) -> str:
        await self._sweep()
        if sum(w.sandbox_id == call.sandbox.id for w in self._watchers.values()) >= MAX_WATCHERS:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED, f"a sandbox may have at most {MAX_WATCHERS} watchers"
            )
        watch = await _open_watch(call, path, recursive)
        watcher_id = secrets.token_hex(12)
        watcher = Watcher(call.sandbox.id, watch)
        watcher.task = asyncio.create_task(watcher.pump(), name=f"e2b watcher {watcher_id}")
        self._watchers[watcher_id] = watcher
        return watcher_id

    def _get(self, call: EnvdCall, watcher_id: str) -> Watcher:
        watcher = self._watchers.get(watcher_id)
        if watcher is None or watcher.sandbox_id != call.sandbox.id:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id!r} not found")
        return watcher

    async def take(self, call: EnvdCall, watcher_id: str) -> list[Message]:
        await self._sweep()
        watcher = self._get(call, watcher_id)
        watcher.last_used = time.monotonic()
        await asyncio.sleep(0)  # let the pump take in what the agent has sent
        events = list(watcher.events)
        watcher.events.clear()
        if not events and watcher.error is not None:
            raise watcher.error
        return events

    async def remove(self, call: EnvdCall, watcher_id: str) -> None:
        self._get(call, watcher_id)
        await self._drop(watcher_id)

    async def _drop(self, watcher_id: str) -> None:
        watcher = self._watchers.pop(watcher_id, None)
        if watcher is None or watcher.task is None:
            return
        watcher.watch.close()
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.task

    async def _sweep(self) -> None:
        now = time.monotonic()
        for watcher_id, watcher in list(self._watchers.items()):
            idle = now - watcher.last_used
            # One whose watch has ended (its directory or its sandbox is gone) goes
            # sooner: its last events have had a minute to be collected.
            if idle > WATCHER_IDLE_S or (watcher.ended and idle > ENDED_KEPT_S):
                await self._drop(watcher_id)

    async def aclose(self) -> None:
        for watcher_id in list(self._watchers):
            await self._drop(watcher_id)


#: One registry per daemon process (watcher ids are random and checked against
#: the sandbox, so daemons sharing a process in tests cannot see each other's).
watchers = Watchers()


@service.unary("CreateWatcher")
async def create_watcher(call: EnvdCall, request: Message) -> Message:
    path, recursive = _watch_options(call, request)
    return {"watcherId": await watchers.create(call, path, recursive)}


@service.unary("GetWatcherEvents")
async def get_watcher_events(call: EnvdCall, request: Message) -> Message:
    watcher_id = _required_path(request, "watcherId")
    return {"events": await watchers.take(call, watcher_id)}


@service.unary("RemoveWatcher")
async def remove_watcher(call: EnvdCall, request: Message) -> Message:
    watcher_id = _required_path(request, "watcherId")
    await watchers.remove(call, watcher_id)
    return {}
