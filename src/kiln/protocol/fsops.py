"""Messages of the filesystem operations beyond read/write/stat/ls.

Frames (each request on its own control connection)::

    FILE_MKDIR_REQ   {"path","parents"?,"mode"?,"user"?}            → FILE_MKDIR_RESP
    FILE_MOVE_REQ    {"source","destination","overwrite"?,"user"?}  → FILE_MOVE_RESP (FileInfo)
    FILE_REMOVE_REQ  {"path","recursive"?,"user"?}                  → FILE_REMOVE_RESP
    FILE_WATCH_REQ   {"path","recursive"?,"user"?}                  → FILE_WATCH_RESP, FILE_EVENT...

A watch runs until the host closes the connection (the agent then drops it) or
the watched directory goes away (the agent sends EXIT 0 and closes). Failures
are ERROR frames whose text starts with the path and the system's reason
("No such file or directory", "File exists", "Not a directory", "Permission
denied", "Directory not empty", ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Self

from .errors import InvalidMessage
from .messages import FileInfo, _get, _Message, _object, _path, _user, parse_mode

#: FILE_EVENT ``type`` values, as E2B's WatchDir reports them.
EVENT_TYPES: Final = ("create", "write", "remove", "rename", "chmod")


def _flag(obj: Any, key: str, default: bool) -> bool:
    value = _get(obj, key, bool)
    return default if value is None else bool(value)


def _named_path(obj: Any, key: str) -> str:
    value: str = _get(obj, key, str, required=True)
    if not value:
        raise InvalidMessage(f"field {key!r} must not be empty")
    if "\x00" in value:
        raise InvalidMessage(f"field {key!r} must not contain NUL bytes")
    return value


@dataclass(frozen=True, slots=True)
class MkdirRequest(_Message):
    """Create a directory; ``parents``: also missing parents (``mkdir -p``).

    An existing directory is not an error: the answer says ``created`` false."""

    path: str
    parents: bool = True
    mode: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None:
            parse_mode(self.mode)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "parents": self.parents}
        if self.mode is not None:
            out["mode"] = self.mode
        if self.user is not None:
            out["user"] = self.user
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "MkdirRequest")
        return cls(
            path=_path(obj),
            parents=_flag(obj, "parents", True),
            mode=_get(obj, "mode", str),
            user=_user(obj),
        )


@dataclass(frozen=True, slots=True)
class MkdirResponse(_Message):
    """FILE_MKDIR_RESP: whether the directory was created (false: it existed), and its info."""

    created: bool
    info: FileInfo

    def to_json(self) -> dict[str, Any]:
        return {"created": self.created, "info": self.info.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "MkdirResponse")
        return cls(
            created=bool(_get(obj, "created", bool, required=True)),
            info=FileInfo.from_json(obj.get("info")),
        )


@dataclass(frozen=True, slots=True)
class MoveRequest(_Message):
    """Rename ``source`` to ``destination`` (across directories too; missing parents
    of the destination are created). An existing destination is an error unless
    ``overwrite`` (then a file replaces a file, a directory an empty directory)."""

    source: str
    destination: str
    overwrite: bool = False
    user: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "destination": self.destination,
            "overwrite": self.overwrite,
        }
        if self.user is not None:
            out["user"] = self.user
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "MoveRequest")
        return cls(
            source=_named_path(obj, "source"),
            destination=_named_path(obj, "destination"),
            overwrite=_flag(obj, "overwrite", False),
            user=_user(obj),
        )


@dataclass(frozen=True, slots=True)
class RemoveRequest(_Message):
    """Remove a file, a symlink (not its target) or an empty directory; with
    ``recursive`` also a directory and everything in it."""

    path: str
    recursive: bool = False
    user: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "recursive": self.recursive}
        if self.user is not None:
            out["user"] = self.user
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "RemoveRequest")
        return cls(path=_path(obj), recursive=_flag(obj, "recursive", False), user=_user(obj))


@dataclass(frozen=True, slots=True)
class WatchRequest(_Message):
    """Watch a directory (and with ``recursive`` its subdirectories) for changes."""

    path: str
    recursive: bool = False
    user: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "recursive": self.recursive}
        if self.user is not None:
            out["user"] = self.user
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "WatchRequest")
        return cls(path=_path(obj), recursive=_flag(obj, "recursive", False), user=_user(obj))


@dataclass(frozen=True, slots=True)
class FileEvent(_Message):
    """FILE_EVENT: ``name`` is relative to the watched directory (``sub/file`` in a
    recursive watch); ``type`` one of :data:`EVENT_TYPES`."""

    name: str
    type: str

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise InvalidMessage(f"field 'type' must be one of {', '.join(EVENT_TYPES)}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "FileEvent")
        return cls(
            name=_get(obj, "name", str, required=True), type=_get(obj, "type", str, required=True)
        )
