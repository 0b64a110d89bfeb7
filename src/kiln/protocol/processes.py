"""Messages of the process table: background commands and TTY sessions by pid.

A background process runs detached from any connection; the agent keeps the
last :data:`OUTPUT_KEPT` bytes of its stdout and of its stderr for readers that
come later. TTY sessions are in the same table (with their ``session_id``).

Frames (each request on its own control connection)::

    PROC_START   {"cmd","env"?,"cwd"?,"user"?,       → PROC_INFO | PROC_STATUS error
                  "stdin"?,"tag"?,"tty"?,"rows"?,"cols"?}
    PROC_LIST_REQ                                   → PROC_LIST_RESP [ProcessInfo...]
    PROC_ATTACH  {"pid","replay"?,"follow"?}        → PROC_INFO, STDOUT/STDERR..., EXIT
    PROC_INPUT   {"pid","size","close"?} + STDIN...  → PROC_STATUS
    PROC_SIGNAL  {"pid","signal"}                   → PROC_STATUS
    PROC_RESIZE  {"pid","rows","cols"}              → PROC_STATUS

``stdin`` false starts the process with its stdin already at end-of-file.
``tty`` starts it on a terminal of ``rows`` x ``cols``, detached: a TTY session
(with its id) that takes input, signals, resizes and readers by pid like any
other entry; its output is all STDOUT. ``tag`` is a name of the caller's
choosing, listed with the process; ``env`` and ``cwd`` as given are listed too.
A ``cwd`` of ``~`` or ``~/...`` is in the home of the user it runs as.

Without ``follow`` a reader gets only what is kept now, then EXIT if the process
has finished, else PROC_STATUS ok as the end mark.

PROC_STATUS errors carry a machine-readable ``reason`` (:class:`Reason`) so the
host can answer 404, 409 or 422 without parsing prose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Self

from .errors import InvalidMessage
from .messages import (
    _float,
    _get,
    _int,
    _Message,
    _nonneg,
    _object,
    _str_map,
    decode_json,
    encode_json,
)

#: Bytes of stdout, and of stderr, a background process keeps for later readers.
OUTPUT_KEPT: Final = 1 << 20
#: Signals a process may be sent by name (as ``kill -s``), without the SIG prefix.
SIGNAL_NAMES: Final = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2")
#: Largest PROC_INPUT ``size``. The agent holds it whole before writing (so input
#: cut short by a dropped connection writes nothing): bounded well below a
#: small sandbox's memory. More input is more requests.
MAX_INPUT: Final = 16 << 20


class Reason(StrEnum):
    """Why a process request failed."""

    NOT_FOUND = "not_found"  # no process with that pid in the table
    FINISHED = "finished"  # it has exited: no more input or signals
    CANNOT_START = "cannot_start"  # not found / not executable / bad cwd
    INVALID = "invalid"  # the request itself is wrong
    NO_TERMINAL = "no_terminal"  # a resize for a process without a terminal


def _pid(obj: Mapping[str, Any]) -> int:
    pid = _int(obj, "pid", required=True)
    assert pid is not None
    if pid <= 0:
        raise InvalidMessage(f"field 'pid' must be positive, got {pid}")
    return pid


def _cmd(obj: Mapping[str, Any]) -> tuple[str, ...]:
    cmd = obj.get("cmd")
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise InvalidMessage("field 'cmd' must be a non-empty list of strings")
    return tuple(cmd)


def signal_name(value: str) -> str:
    """A signal name as the wire carries it ("TERM"); accepts "SIGTERM" and any case."""
    name = value.upper().removeprefix("SIG")
    if name not in SIGNAL_NAMES:
        allowed = ", ".join(SIGNAL_NAMES)
        raise InvalidMessage(f"unknown signal {value!r}: expected one of {allowed}")
    return name


def _size(name: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= 0xFFFF:
        raise InvalidMessage(f"field {name!r} must be within 1..65535, got {value}")


@dataclass(frozen=True, slots=True)
class ProcessStart(_Message):
    cmd: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    #: False: stdin is at end-of-file from the start (nothing can be sent to it).
    stdin: bool = True
    tag: str | None = None
    tty: bool = False
    rows: int | None = None
    cols: int | None = None

    def __post_init__(self) -> None:
        _size("rows", self.rows)
        _size("cols", self.cols)
        if not self.tty and (self.rows is not None or self.cols is not None):
            raise InvalidMessage("fields 'rows' and 'cols' are only valid with 'tty': true")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd": list(self.cmd)}
        if self.env:
            out["env"] = dict(self.env)
        if not self.stdin:
            out["stdin"] = False
        if self.tty:
            out["tty"] = True
        for key in ("cwd", "user", "tag", "rows", "cols"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ProcessStart")
        stdin = _get(obj, "stdin", bool)
        return cls(
            cmd=_cmd(obj),
            env=_str_map(obj, "env"),
            cwd=_get(obj, "cwd", str),
            user=_get(obj, "user", str),
            stdin=True if stdin is None else stdin,
            tag=_get(obj, "tag", str),
            tty=bool(_get(obj, "tty", bool)),
            rows=_int(obj, "rows"),
            cols=_int(obj, "cols"),
        )


@dataclass(frozen=True, slots=True)
class ProcessInfo(_Message):
    """One entry of the process table."""

    pid: int
    cmd: tuple[str, ...]
    running: bool
    started_at: float
    exit_code: int | None = None
    finished_at: float | None = None
    tty: bool = False
    session_id: str | None = None
    user: str | None = None
    #: As the start request gave them (None for sessions started by EXEC_REQ).
    tag: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "cmd": list(self.cmd),
            "running": self.running,
            "exit_code": self.exit_code,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "tty": self.tty,
            "session_id": self.session_id,
            "user": self.user,
            "tag": self.tag,
            "cwd": self.cwd,
            "env": dict(self.env),
        }

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ProcessInfo")
        return cls(
            pid=_pid(obj),
            cmd=_cmd(obj),
            running=bool(_get(obj, "running", bool)),
            started_at=_float(obj, "started_at", required=True) or 0.0,
            exit_code=_int(obj, "exit_code"),
            finished_at=_float(obj, "finished_at"),
            tty=bool(_get(obj, "tty", bool)),
            session_id=_get(obj, "session_id", str),
            user=_get(obj, "user", str),
            tag=_get(obj, "tag", str),
            cwd=_get(obj, "cwd", str),
            env=_str_map(obj, "env"),
        )


def process_list_to_payload(processes: list[ProcessInfo]) -> bytes:
    return encode_json([p.to_json() for p in processes])


def process_list_from_payload(payload: bytes) -> list[ProcessInfo]:
    data = decode_json(payload)
    if not isinstance(data, list):
        raise InvalidMessage(f"process list must be a JSON array, got {type(data).__name__}")
    return [ProcessInfo.from_json(item) for item in data]


@dataclass(frozen=True, slots=True)
class ProcessAttach(_Message):
    """Read a process's output: what is kept (``replay``), then live (``follow``),
    then EXIT."""

    pid: int
    replay: bool = True
    follow: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "replay": self.replay, "follow": self.follow}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ProcessAttach")
        replay = _get(obj, "replay", bool)
        follow = _get(obj, "follow", bool)
        return cls(
            pid=_pid(obj),
            replay=True if replay is None else replay,
            follow=True if follow is None else follow,
        )


@dataclass(frozen=True, slots=True)
class ProcessInput(_Message):
    """``size`` bytes of STDIN frames follow; ``close`` closes stdin after them."""

    pid: int
    size: int
    close: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.size <= MAX_INPUT:
            raise InvalidMessage(f"field 'size' must be within 0..{MAX_INPUT}, got {self.size}")

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "size": self.size, "close": self.close}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ProcessInput")
        size = _nonneg(obj, "size", required=True)
        assert size is not None
        return cls(pid=_pid(obj), size=size, close=bool(_get(obj, "close", bool)))


@dataclass(frozen=True, slots=True)
class ProcessSignal(_Message):
    """A signal for the process's whole process group."""

    pid: int
    signal: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "signal", signal_name(self.signal))

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "signal": self.signal}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ProcessSignal")
        return cls(pid=_pid(obj), signal=_get(obj, "signal", str, required=True))


@dataclass(frozen=True, slots=True)
class ProcessResize(_Message):
    """A new terminal size for a process started with ``tty``."""

    pid: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        _size("rows", self.rows)
        _size("cols", self.cols)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "rows": self.rows, "cols": self.cols}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ProcessResize")
        rows = _int(obj, "rows", required=True)
        cols = _int(obj, "cols", required=True)
        assert rows is not None and cols is not None
        return cls(pid=_pid(obj), rows=rows, cols=cols)


@dataclass(frozen=True, slots=True)
class ProcessStatus(_Message):
    """PROC_STATUS: ``{"status":"ok"}`` or ``{"status":"error","reason","message"}``."""

    reason: Reason | None = None
    message: str | None = None
    #: With CANNOT_START: the exit code an exec of the same command would have had.
    exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @classmethod
    def error(cls, reason: Reason, message: str, exit_code: int | None = None) -> Self:
        return cls(reason, message, exit_code)

    def to_json(self) -> dict[str, Any]:
        if self.reason is None:
            return {"status": "ok"}
        out: dict[str, Any] = {"status": "error", "reason": self.reason.value}
        out["message"] = self.message or self.reason.value
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        return out

    @classmethod
    def from_json(cls, data: Any) -> Self:
        obj = _object(data, "ProcessStatus")
        status = _get(obj, "status", str, required=True)
        if status == "ok":
            return cls()
        if status != "error":
            raise InvalidMessage(f"field 'status' must be 'ok' or 'error', got {status!r}")
        reason_text = _get(obj, "reason", str) or Reason.INVALID.value
        try:
            reason = Reason(reason_text)
        except ValueError:
            reason = Reason.INVALID  # a newer agent's reason: still an error
        # As to_json writes it: an error without a message carries its reason.
        message = _get(obj, "message", str) or reason.value
        return cls(reason, message, _int(obj, "exit_code"))


__all__ = [
    "MAX_INPUT",
    "OUTPUT_KEPT",
    "SIGNAL_NAMES",
    "ProcessAttach",
    "ProcessInfo",
    "ProcessInput",
    "ProcessResize",
    "ProcessSignal",
    "ProcessStart",
    "ProcessStatus",
    "Reason",
    "process_list_from_payload",
    "process_list_to_payload",
    "signal_name",
]
