"""JSON messages carried in frame payloads, as frozen dataclasses.

Every ``from_json``/``from_payload`` validates strictly (types, required
fields, ranges) and raises :class:`InvalidMessage` with a message naming the
field, so a peer's mistake becomes one clear line instead of a KeyError.
Unknown fields are ignored for forward compatibility.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from .errors import InvalidMessage

T = TypeVar("T")

#: The session id of the config drive's init script.
INIT_SESSION_ID = "init"
#: Cap of FILE_LS_RESP entries; past it a sentinel entry says "truncated".
LS_LIMIT = 10_000
#: The image's unprivileged user (uid and gid 1000): commands run as it unless an
#: ExecRequest names another. Defined here because the image builder, the guest
#: agent and the daemon (which lets clients pick it or root) must all agree on it.
SANDBOX_USER = "sandbox"
SANDBOX_UID = 1000
#: The only other user a client of the daemon may ask for.
ROOT_USER = "root"
#: Deepest FILE_LS_REQ ``depth``.
MAX_LS_DEPTH = 64
#: Largest CLOCK_SET seed, in bytes.
MAX_CLOCK_SEED = 4096


def encode_json(obj: Any) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # Lone surrogates (a non-UTF-8 file name decoded with surrogateescape) cannot
        # be UTF-8; as \uXXXX escapes they are still valid JSON and decode back to
        # the same str on the other side.
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(payload: bytes) -> Any:
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16/32, and the
        # wire format is UTF-8. NaN/Infinity are Python extensions, not JSON.
        return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidMessage(f"payload is not valid JSON: {exc}") from None
    except RecursionError:
        # A 1 MiB frame of "[[[[..." nests deeper than the parser's recursion limit.
        raise InvalidMessage("payload JSON is nested too deeply") from None


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise InvalidMessage(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _typename(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _get(
    data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, required: bool = False
) -> Any:
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidMessage(f"field {key!r} is required")
        return None
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidMessage(f"field {key!r} must be {_typename(kind)}, got bool")
    if not isinstance(value, kind):
        raise InvalidMessage(f"field {key!r} must be {_typename(kind)}, got {type(value).__name__}")
    return value


def _int(data: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    value: int | float | None = _get(data, key, (int, float), required=required)
    if isinstance(value, float):
        # JSON numbers may arrive as 3.0 from some encoders; accept only whole ones.
        if not value.is_integer():
            raise InvalidMessage(f"field {key!r} must be an integer, got {value}")
        value = int(value)
    return value


def _float(data: Mapping[str, Any], key: str, *, required: bool = False) -> float | None:
    value: int | float | None = _get(data, key, (int, float), required=required)
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:  # a JSON integer of 309 digits or more
        raise InvalidMessage(f"field {key!r} is out of range") from None


def _nonneg(data: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    value = _int(data, key, required=required)
    if value is not None and value < 0:
        raise InvalidMessage(f"field {key!r} must not be negative, got {value}")
    return value


def _str_map(data: Mapping[str, Any], key: str) -> dict[str, str]:
    value = _get(data, key, dict)
    if value is None:
        return {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise InvalidMessage(f"field {key!r}: value of {k!r} must be a string")
    return dict(value)


def parse_mode(text: str) -> int:
    """Parse an octal mode string like ``"0644"`` (or ``"644"``)."""
    # int(text, 8) alone would also take "0o644", " 644", "+644" and "6_44".
    if not isinstance(text, str) or not 1 <= len(text) <= 6 or text.strip("01234567"):
        raise InvalidMessage(f"mode {text!r} is not an octal number")
    mode = int(text, 8)
    if not 0 <= mode <= 0o7777:
        raise InvalidMessage(f"mode {text!r} is out of range")
    return mode


def format_mode(mode: int) -> str:
    return f"{mode & 0o7777:04o}"


class _Message:
    """Shared JSON plumbing; subclasses define ``to_json`` and ``from_json``."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: Any) -> Self:
        raise NotImplementedError

    def to_payload(self) -> bytes:
        return encode_json(self.to_json())

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls.from_json(decode_json(payload))


@dataclass(frozen=True, slots=True)
class ExecRequest(_Message):
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    tty: bool = False
    rows: int | None = None
    cols: int | None = None
    session_id: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.session_id is None and not self.cmd:
            raise InvalidMessage("field 'cmd' must be a non-empty list of strings")
        if not all(isinstance(a, str) for a in self.cmd):
            raise InvalidMessage("field 'cmd' must be a list of strings")
        if self.session_id is not None and not self.tty:
            raise InvalidMessage("field 'session_id' is only valid with 'tty': true")
        for name, value in (("rows", self.rows), ("cols", self.cols)):
            if value is not None and not 0 <= value <= 0xFFFF:
                raise InvalidMessage(f"field {name!r} must be within 0..65535, got {value}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd": list(self.cmd)}
        if self.env:
            out["env"] = dict(self.env)
        if self.cwd is not None:
            out["cwd"] = self.cwd
        if self.tty:
            out["tty"] = True
        for key in ("rows", "cols", "session_id", "user"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ExecRequest")
        cmd = obj.get("cmd")
        if cmd is None:
            cmd = []
        if not isinstance(cmd, list) or not all(isinstance(a, str) for a in cmd):
            raise InvalidMessage("field 'cmd' must be a list of strings")
        return cls(
            cmd=tuple(cmd),
            env=_str_map(obj, "env"),
            cwd=_get(obj, "cwd", str),
            tty=bool(_get(obj, "tty", bool) or False),
            rows=_nonneg(obj, "rows"),
            cols=_nonneg(obj, "cols"),
            session_id=_get(obj, "session_id", str),
            user=_get(obj, "user", str),
        )


@dataclass(frozen=True, slots=True)
class SessionInfo(_Message):
    session_id: str
    argv: str
    tty: bool
    running: bool
    attached: bool
    created_at: float
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "argv": self.argv,
            "tty": self.tty,
            "running": self.running,
            "attached": self.attached,
            "created_at": self.created_at,
            "exit_code": self.exit_code,
        }

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "SessionInfo")
        return cls(
            session_id=_get(obj, "session_id", str, required=True),
            argv=_get(obj, "argv", str) or "",
            tty=bool(_get(obj, "tty", bool)),
            running=bool(_get(obj, "running", bool)),
            attached=bool(_get(obj, "attached", bool)),
            created_at=_float(obj, "created_at") or 0.0,
            exit_code=_int(obj, "exit_code"),
        )


@dataclass(frozen=True, slots=True)
class ActivityInfo(_Message):
    last_activity_unix: float
    attached_sessions: int = 0
    running_sessions: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "last_activity_unix": self.last_activity_unix,
            "attached_sessions": self.attached_sessions,
            "running_sessions": self.running_sessions,
        }

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ActivityInfo")
        return cls(
            last_activity_unix=_float(obj, "last_activity_unix", required=True) or 0.0,
            attached_sessions=_nonneg(obj, "attached_sessions") or 0,
            running_sessions=_nonneg(obj, "running_sessions") or 0,
        )


#: FileInfo ``type`` values.
FILE_TYPES = ("file", "dir", "symlink", "other")


@dataclass(frozen=True, slots=True)
class FileInfo(_Message):
    """A file's metadata. The first five fields are the original protocol; the rest
    are optional extensions (sent by newer agents, absent from older ones):

    ``type`` (file, dir, symlink for a dangling link, other), ``symlink`` (the path
    itself is a symbolic link; size, mode and type are then its target's) and
    ``target`` (where it points), ``uid``/``gid`` and their names ``owner``/``group``,
    and ``permissions`` (``ls -l`` style, e.g. ``-rw-r--r--``).
    """

    name: str
    size: int
    mode: str
    is_dir: bool
    mtime: float
    path: str | None = None
    type: str | None = None
    symlink: bool = False
    target: str | None = None
    uid: int | None = None
    gid: int | None = None
    owner: str | None = None
    group: str | None = None
    permissions: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "mode": self.mode,
            "is_dir": self.is_dir,
            "mtime": self.mtime,
        }
        for key in ("path", "type", "target", "uid", "gid", "owner", "group", "permissions"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.symlink:
            out["symlink"] = True
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "FileInfo")
        return cls(
            name=_get(obj, "name", str, required=True),
            size=_nonneg(obj, "size", required=True) or 0,
            mode=_get(obj, "mode", str, required=True),
            is_dir=bool(_get(obj, "is_dir", bool)),
            mtime=_float(obj, "mtime") or 0.0,
            path=_get(obj, "path", str),
            type=_get(obj, "type", str),
            symlink=bool(_get(obj, "symlink", bool)),
            target=_get(obj, "target", str),
            uid=_nonneg(obj, "uid"),
            gid=_nonneg(obj, "gid"),
            owner=_get(obj, "owner", str),
            group=_get(obj, "group", str),
            permissions=_get(obj, "permissions", str),
        )


@dataclass(frozen=True, slots=True)
class FileListing:
    """A FILE_LS_RESP: entries sorted by name, and whether the cap cut it short."""

    entries: tuple[FileInfo, ...]
    truncated: bool = False
    total: int = 0

    def to_payload(self) -> bytes:
        items: list[dict[str, Any]] = [e.to_json() for e in self.entries]
        if self.truncated:
            items.append({"name": "...", "truncated": True, "total": self.total})
        return encode_json(items)

    @classmethod
    def from_payload(cls, payload: bytes) -> FileListing:
        data = decode_json(payload)
        if not isinstance(data, list):
            raise InvalidMessage("FILE_LS_RESP must be a JSON list")
        entries: list[FileInfo] = []
        truncated, total = False, 0
        for item in data:
            if isinstance(item, dict) and item.get("truncated") is True:
                truncated, total = True, _nonneg(item, "total") or 0
                continue
            entries.append(FileInfo.from_json(item))
        return cls(tuple(entries), truncated, total if truncated else len(entries))


def session_list_from_payload(payload: bytes) -> list[SessionInfo]:
    data = decode_json(payload)
    if not isinstance(data, list):
        raise InvalidMessage("EXEC_LIST_RESP must be a JSON list")
    return [SessionInfo.from_json(item) for item in data]


def session_list_to_payload(sessions: list[SessionInfo]) -> bytes:
    return encode_json([s.to_json() for s in sessions])


@dataclass(frozen=True, slots=True)
class FileReadRequest(_Message):
    path: str
    offset: int = 0
    limit: int = 0
    max_bytes: int = 0
    #: Optional: read as this user (their permissions; relative paths from their home).
    user: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "offset": self.offset,
            "limit": self.limit,
            "max_bytes": self.max_bytes,
        }
        if self.user is not None:
            out["user"] = self.user
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "FileReadRequest")
        return cls(
            path=_path(obj),
            offset=_nonneg(obj, "offset") or 0,
            limit=_nonneg(obj, "limit") or 0,
            max_bytes=_nonneg(obj, "max_bytes") or 0,
            user=_user(obj),
        )


@dataclass(frozen=True, slots=True)
class FileReadResponse(_Message):
    size: int
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "mode": self.mode}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "FileReadResponse")
        return cls(
            size=_nonneg(obj, "size", required=True) or 0,
            mode=_get(obj, "mode", str) or "0644",
        )


@dataclass(frozen=True, slots=True)
class FileWriteRequest(_Message):
    path: str
    size: int
    mode: str | None = None
    #: Optional: write as this user (their permissions; new files and directories
    #: are theirs; relative paths from their home).
    user: str | None = None

    def __post_init__(self) -> None:
        if self.size < 0:
            raise InvalidMessage(f"field 'size' must not be negative, got {self.size}")
        if self.mode is not None:
            parse_mode(self.mode)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size}
        if self.mode is not None:
            out["mode"] = self.mode
        if self.user is not None:
            out["user"] = self.user
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "FileWriteRequest")
        size = _int(obj, "size")
        if size is None:
            raise InvalidMessage("field 'size' is required")
        return cls(path=_path(obj), size=size, mode=_get(obj, "mode", str), user=_user(obj))


@dataclass(frozen=True, slots=True)
class PathRequest(_Message):
    """FILE_STAT_REQ and FILE_LS_REQ: a path, and optional extensions: ``user`` (act
    as this user), ``details`` (FileInfo with its extension fields; without it the
    answer has exactly the original fields) and, for FILE_LS_REQ, ``depth`` (1: the
    directory's entries; 2: also its subdirectories' entries, ...; entries then
    carry ``path``)."""

    path: str
    user: str | None = None
    depth: int | None = None
    details: bool = False

    def __post_init__(self) -> None:
        if self.depth is not None and not 1 <= self.depth <= MAX_LS_DEPTH:
            raise InvalidMessage(f"field 'depth' must be within 1..{MAX_LS_DEPTH}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        if self.user is not None:
            out["user"] = self.user
        if self.depth is not None:
            out["depth"] = self.depth
        if self.details:
            out["details"] = True
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "request")
        return cls(
            path=_path(obj),
            user=_user(obj),
            depth=_int(obj, "depth"),
            details=bool(_get(obj, "details", bool)),
        )


def _user(obj: Mapping[str, Any]) -> str | None:
    user: str | None = _get(obj, "user", str)
    if user is not None and (not user or "\x00" in user or len(user) > 256):
        raise InvalidMessage("field 'user' must be a user name or uid")
    return user


def _path(obj: Mapping[str, Any]) -> str:
    path: str = _get(obj, "path", str, required=True)
    if not path:
        raise InvalidMessage("field 'path' must not be empty")
    if "\x00" in path:
        raise InvalidMessage("field 'path' must not contain NUL bytes")
    return path


@dataclass(frozen=True, slots=True)
class StatusResponse(_Message):
    """FWD_RESP, FILE_WRITE_RESP, CLOCK_SET_RESP: ``{"status": "ok"|"error", "message"?}``."""

    status: str = "ok"
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.message is not None:
            out["message"] = self.message
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "status response")
        return cls(
            status=_get(obj, "status", str, required=True),
            message=_get(obj, "message", str),
        )


@dataclass(frozen=True, slots=True)
class ForwardRequest(_Message):
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise InvalidMessage(f"field 'port' must be within 1..65535, got {self.port}")

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        port = _int(_object(data, "ForwardRequest"), "port", required=True)
        assert port is not None
        return cls(port=port)


@dataclass(frozen=True, slots=True)
class ExecKillRequest(_Message):
    session_id: str

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ExecKillRequest")
        return cls(session_id=_get(obj, "session_id", str, required=True))


@dataclass(frozen=True, slots=True)
class ClockSet(_Message):
    """CLOCK_SET: the host's wall clock, and optional host randomness for the guest RNG.

    ``seed`` (at most MAX_CLOCK_SEED bytes, hex on the wire) is mixed into the
    guest's entropy pool, so clones restored from one snapshot stop sharing RNG state.
    """

    unix_ns: int
    seed: bytes | None = None

    def __post_init__(self) -> None:
        if self.unix_ns < 0:
            raise InvalidMessage(f"field 'unix_ns' must not be negative, got {self.unix_ns}")
        if self.seed is not None and len(self.seed) > MAX_CLOCK_SEED:
            raise InvalidMessage(f"field 'seed' must be at most {MAX_CLOCK_SEED} bytes")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unix_ns": self.unix_ns}
        if self.seed is not None:
            out["seed"] = self.seed.hex()
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ClockSet")
        value = _nonneg(obj, "unix_ns", required=True)
        assert value is not None
        seed_hex = _get(obj, "seed", str)
        seed = None
        if seed_hex is not None:
            try:
                seed = bytes.fromhex(seed_hex)
            except ValueError:
                raise InvalidMessage("field 'seed' must be a hex string") from None
        return cls(unix_ns=value, seed=seed)
