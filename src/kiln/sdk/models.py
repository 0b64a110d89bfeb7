"""Typed values the daemon returns: the API's shared response models
(:mod:`kiln.api.responses`), validated here, plus the SDK's own byte-level types.

:func:`parse` validates an answer with its model and raises
:class:`~kiln.sdk.errors.InvalidResponse` naming the field; unknown fields are
ignored so a newer daemon keeps working with an older SDK.

File listings use the wire protocol's own types
(:class:`~kiln.protocol.messages.FileInfo`, :class:`~kiln.protocol.messages.FileListing`),
because the HTTP API passes them through unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from kiln.api.responses import (
    Capabilities,
    ErrorEvent,
    ExecResult,
    ExitEvent,
    Health,
    ImageInfo,
    LastBoot,
    NetworkPolicy,
    NodeInfo,
    OutputEvent,
    Port,
    ProcessInfo,
    PublishedPort,
    SandboxInfo,
    SavedImage,
    Secret,
    SessionInfo,
    Template,
    Volume,
    VolumeMount,
)
from kiln.api.responses import ExecEvent as ExecEventLine

from .errors import InvalidResponse, ServerError

if TYPE_CHECKING:
    from kiln.protocol.fsops import FileEvent
    from kiln.protocol.messages import FileInfo, FileListing

__all__ = [
    "Capabilities",
    "ExecEvent",
    "ExecResult",
    "Exit",
    "FileContent",
    "FileStat",
    "Health",
    "ImageInfo",
    "LastBoot",
    "NetworkPolicy",
    "NewVolume",
    "NodeInfo",
    "Port",
    "ProcessInfo",
    "PublishedPort",
    "SandboxInfo",
    "SavedImage",
    "Secret",
    "SessionInfo",
    "Stderr",
    "Stdout",
    "Template",
    "Volume",
    "VolumeMount",
    "parse",
    "parse_exec_event",
]

T = TypeVar("T")


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def _problem(exc: ValidationError) -> str:
    """The first error, naming the field: ``field 'cpus': Input should be ...``."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in err["loc"])
    kind = err["type"]
    if kind == "missing":
        return f"field {where!r} is missing"
    field = f"field {where!r}: " if where else ""
    got = type(err["input"]).__name__
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{field}expected a JSON object, got {got}"
    if kind in ("list_type", "tuple_type"):
        return f"{field}expected a JSON list, got {got}"
    return f"{field}{err['msg']}, got {err['input']!r:.80}"


def parse(kind: type[T], data: Any, what: str | None = None) -> T:
    """``data`` (decoded JSON) validated as ``kind`` (a model, or ``list[Model]``);
    :class:`InvalidResponse` names ``what`` (default: the model) and the field."""
    try:
        value: T = _adapter(kind).validate_python(data)
    except ValidationError as exc:
        what = what or getattr(kind, "__name__", "answer")
        raise InvalidResponse(f"{what}: {_problem(exc)}") from None
    return value


# -- exec ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stdout:
    """A chunk of the command's standard output, as raw bytes."""

    data: bytes

    @property
    def text(self) -> str:
        """The chunk decoded as UTF-8 (invalid bytes, or a character split across chunks,
        replaced)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Stderr:
    """A chunk of the command's standard error, as raw bytes."""

    data: bytes

    @property
    def text(self) -> str:
        """The chunk decoded as UTF-8 (invalid bytes replaced)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Exit:
    """The command ended; always the last event of a stream.

    ``timed_out`` is true when the daemon killed it at ``timeout_s`` (exit code 124).
    """

    exit_code: int
    timed_out: bool = False


ExecEvent = Stdout | Stderr | Exit
_EVENT_TYPES = ("stdout", "stderr", "exit", "error")


def parse_exec_event(line: str | bytes, encoding: str | None = None) -> ExecEvent | None:
    """One NDJSON line of a streamed exec → an event; ``None`` for blank or unknown lines.

    An ``{"type": "error", "error": ...}`` line (the daemon failing mid-stream)
    raises :class:`~kiln.sdk.errors.ServerError`.
    """
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError:
        raise InvalidResponse(f"exec stream: a line is not JSON: {line[:80]!r}") from None
    if isinstance(data, dict) and data.get("type") not in _EVENT_TYPES:
        return None  # a newer daemon's event type: skip it
    event: OutputEvent | ExitEvent | ErrorEvent = parse(
        ExecEventLine,  # type: ignore[arg-type]
        data,
        "exec event",
    )
    if isinstance(event, ExitEvent):
        return Exit(event.exit_code, event.timed_out)
    if not isinstance(event, OutputEvent):
        raise ServerError(event.error or "exec failed", 500)
    chunk = event.data.encode("utf-8", "surrogateescape")
    if encoding == "base64" or event.encoding == "base64":
        try:
            chunk = base64.b64decode(chunk, validate=True)
        except binascii.Error:
            raise InvalidResponse("exec event: 'data' is not valid base64") from None
    return Stdout(chunk) if event.type == "stdout" else Stderr(chunk)


# -- files --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileContent:
    """What :meth:`Files.read` returns: the bytes read and the file's total size.

    ``truncated`` is true when ``offset``/``limit``/``max_bytes`` cut the read
    short of the whole file.
    """

    data: bytes
    size: int
    truncated: bool

    @property
    def text(self) -> str:
        """The content decoded as UTF-8 (invalid bytes replaced)."""
        return self.data.decode("utf-8", "replace")

    def to_dict(self) -> dict[str, Any]:
        """Size information only (the bytes are not JSON)."""
        return {"size": self.size, "truncated": self.truncated, "length": len(self.data)}


@dataclass(frozen=True, slots=True)
class FileStat:
    """``HEAD`` on a path (its answer is headers): size, octal mode string
    (``"0644"``), directory or not."""

    path: str
    size: int
    mode: str
    is_dir: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_file_listing(body: bytes) -> FileListing:
    """A JSON list of FileInfo (with an optional "truncated" sentinel) → :class:`FileListing`."""
    # kiln.protocol is imported when first needed: its package pulls in asyncio,
    # which the sync client (and the CLI's start-up) can do without.
    from kiln.protocol import FileListing, InvalidMessage  # noqa: PLC0415

    try:
        return FileListing.from_payload(body)
    except InvalidMessage as exc:
        raise InvalidResponse(f"file listing: {exc}") from exc


def parse_file_info(data: Any) -> FileInfo:
    """One FileInfo object."""
    from kiln.protocol import FileInfo, InvalidMessage  # noqa: PLC0415 - see above

    try:
        return FileInfo.from_json(data)
    except InvalidMessage as exc:
        raise InvalidResponse(f"file info: {exc}") from exc


def parse_file_event(line: str) -> FileEvent | None:
    """One line of a watch stream (None for a blank one)."""
    from kiln.protocol import FileEvent, InvalidMessage  # noqa: PLC0415 - see above

    if not line.strip():
        return None
    try:
        return FileEvent.from_payload(line.encode())
    except InvalidMessage as exc:
        raise InvalidResponse(f"watch event: {exc}") from exc


# -- requests -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewVolume:
    """A volume created together with the sandbox: ``size_mb`` MiB at ``mount``."""

    name: str
    size_mb: int
    mount: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
