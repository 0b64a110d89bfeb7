"""Typed values the daemon returns, and their parsers (pure: JSON in, dataclass out).

Parsers validate the fields the SDK relies on and raise
:class:`~kiln.sdk.errors.InvalidResponse` naming the field; unknown fields are
ignored so a newer daemon keeps working with an older SDK.

File and session listings use the wire protocol's own types
(:class:`~kiln.protocol.messages.FileInfo`, :class:`~kiln.protocol.messages.SessionInfo`),
because the HTTP API passes them through unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import InvalidResponse, ServerError

if TYPE_CHECKING:
    from kiln.protocol.fsops import FileEvent
    from kiln.protocol.messages import FileInfo, FileListing, SessionInfo

T = TypeVar("T")


# -- field helpers ----------------------------------------------------------------


def _obj(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise InvalidResponse(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _list(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise InvalidResponse(f"{what}: expected a JSON list, got {type(data).__name__}")
    return data


def _field(
    obj: Mapping[str, Any], key: str, kind: type[T], what: str, default: T | None = None
) -> T:
    value = obj.get(key)
    if value is None:
        if default is None:
            raise InvalidResponse(f"{what}: field {key!r} is missing")
        return default
    # bool is an int in Python; a JSON true is never a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidResponse(f"{what}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidResponse(f"{what}: field {key!r} must be a string, got {value!r}")
    return value


def _opt_int(obj: Mapping[str, Any], key: str, what: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InvalidResponse(f"{what}: field {key!r} must be an integer, got {value!r}")
    return int(value)


def parse_time(value: Any, what: str = "timestamp") -> datetime | None:
    """An RFC 3339 string (or unix seconds) → an aware :class:`datetime`; ``None`` stays."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidResponse(f"{what}: {value!r} is not an RFC 3339 time") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise InvalidResponse(f"{what}: {value!r} is not an RFC 3339 time")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


class _Model:
    """``to_dict()`` for dataclasses: JSON-able, times as RFC 3339, private fields left out."""

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in fields(self)  # type: ignore[arg-type]
            if not f.name.startswith("_")
        }


# -- sandboxes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities(_Model):
    """What a sandbox's engine can do with it (ask this, not the engine's name).

    ``pause``: it can go warm (processes frozen, memory kept; resumes in
    milliseconds). ``snapshots``: its running state can be saved to disk, so it
    can go cold and a stop keeps its processes and memory; without snapshots a
    stop keeps its files but ends its processes, and a start boots it again.
    ``fork``: ``fork()`` can copy it, running processes and all.
    """

    pause: bool = True
    snapshots: bool = True
    fork: bool = False


@dataclass(frozen=True, slots=True)
class NetworkPolicy(_Model):
    """Where a sandbox may connect outside kiln (its *egress*).

    ``allow`` and ``deny`` list IPv4 CIDRs or domain names; the first match
    decides, in the order ``allow``, ``deny``, then ``egress`` (``"allow"`` or
    ``"deny"``). ``NetworkPolicy("deny", allow=["pypi.org"])`` reaches PyPI and
    nothing else. Whatever the policy, a sandbox never reaches the host, cloud
    metadata (169.254.0.0/16), other users' sandboxes or agent ports; the daemon
    may block more (its ``firewall.blocked`` ranges, by default the private ones).
    """

    egress: str = "allow"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"egress": self.egress, "allow": list(self.allow), "deny": list(self.deny)}


@dataclass(frozen=True, slots=True)
class LastBoot(_Model):
    """How a sandbox's machine came up last, and when.

    ``reason`` is ``created`` (its create), ``restored`` (from its snapshot: its
    processes and memory kept), ``started`` (booted by a start after a stop that
    ended its processes) or ``rebooted`` (its machine was lost without a snapshot,
    e.g. by a host reboot, and it booted again from its disks: files kept,
    processes lost).
    """

    reason: str
    at: datetime | None


def parse_last_boot(data: Any) -> LastBoot | None:
    """A sandbox's ``last_boot`` object → :class:`LastBoot`; ``None`` stays."""
    if data is None:
        return None
    what = "sandbox last_boot"
    obj = _obj(data, what)
    return LastBoot(
        reason=_field(obj, "reason", str, what), at=parse_time(obj.get("at"), f"{what} at")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxInfo(_Model):
    """A sandbox as the daemon reports it.

    ``status`` is ``running`` (whatever the thermal state), ``stopped`` after an
    explicit stop, or ``error``; ``thermal`` is ``hot``, ``warm`` or ``cold``.
    ``expires_at`` is when the daemon will ``on_expire`` it (``destroy`` or
    ``stop``); ``None`` means never.

    ``engine`` is ``qemu`` (a microVM) or ``docker`` (a container), and
    ``runtime`` the Docker runtime (``runc`` or ``runsc``; ``None`` for QEMU).
    ``capabilities`` is ``None`` when the daemon did not say: one from before
    engines had capabilities, or a sandbox caught in the middle of a create,
    stop or start. ``network`` is its egress policy (``None`` from a daemon from
    before policies). ``last_boot`` (:class:`LastBoot`) is how its machine came
    up last; ``None`` from a daemon that does not say.
    """

    id: str
    name: str
    status: str
    thermal: str
    ip: str | None
    cpus: int
    memory_mb: int
    keep_hot: bool
    engine: str
    image: str
    created_at: datetime | None
    last_active_at: datetime | None
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    expires_at: datetime | None = None
    on_expire: str = "destroy"
    runtime: str | None = None
    capabilities: Capabilities | None = None
    network: NetworkPolicy | None = None
    last_boot: LastBoot | None = None


def parse_network(data: Any) -> NetworkPolicy | None:
    """A sandbox's ``network`` object → :class:`NetworkPolicy`; ``None`` stays."""
    if data is None:
        return None
    what = "sandbox network"
    obj = _obj(data, what)
    lists = {}
    for key in ("allow", "deny"):
        value = obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidResponse(f"{what}: field {key!r} must be a list of strings")
        lists[key] = tuple(value)
    return NetworkPolicy(_field(obj, "egress", str, what, "allow"), lists["allow"], lists["deny"])


def parse_capabilities(data: Any) -> Capabilities | None:
    """A sandbox's ``capabilities`` object → :class:`Capabilities`; ``None`` stays."""
    if data is None:
        return None
    what = "sandbox capabilities"
    obj = _obj(data, what)
    return Capabilities(
        pause=_field(obj, "pause", bool, what, True),
        snapshots=_field(obj, "snapshots", bool, what, True),
        fork=_field(obj, "fork", bool, what, False),
    )


def _labels(obj: Mapping[str, Any], what: str) -> dict[str, str]:
    value = obj.get("labels")
    if value is None:
        return {}  # a daemon from before labels
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidResponse(f"{what}: field 'labels' must be an object of strings")
    return dict(value)


def parse_sandbox(data: Any) -> SandboxInfo:
    """A sandbox JSON object → :class:`SandboxInfo`."""
    what = "sandbox"
    obj = _obj(data, what)
    return SandboxInfo(
        id=_field(obj, "id", str, what),
        name=_field(obj, "name", str, what),
        status=_field(obj, "status", str, what),
        thermal=_field(obj, "thermal", str, what, ""),
        ip=_opt_str(obj, "ip", what),
        cpus=_opt_int(obj, "cpus", what) or 0,
        memory_mb=_opt_int(obj, "memory_mb", what) or 0,
        keep_hot=_field(obj, "keep_hot", bool, what, False),
        engine=_field(obj, "engine", str, what, ""),
        image=_field(obj, "image", str, what, ""),
        created_at=parse_time(obj.get("created_at"), "sandbox created_at"),
        last_active_at=parse_time(obj.get("last_active_at"), "sandbox last_active_at"),
        labels=_labels(obj, what),
        expires_at=parse_time(obj.get("expires_at"), "sandbox expires_at"),
        on_expire=_field(obj, "on_expire", str, what, "destroy"),
        runtime=_opt_str(obj, "runtime", what),
        capabilities=parse_capabilities(obj.get("capabilities")),
        network=parse_network(obj.get("network")),
        last_boot=parse_last_boot(obj.get("last_boot")),
    )


# -- exec ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecResult(_Model):
    """The outcome of a buffered exec: exit code and the whole output.

    Output is decoded as UTF-8 (invalid bytes replaced); use
    :meth:`Sandbox.exec_stream` for raw bytes.
    """

    exit_code: int
    stdout: str
    stderr: str
    #: True when the daemon killed the command at ``timeout_s`` (exit code 124).
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0


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


def parse_exec_result(data: Any) -> ExecResult:
    """A buffered exec answer → :class:`ExecResult`."""
    what = "exec result"
    obj = _obj(data, what)
    return ExecResult(
        exit_code=_field(obj, "exit_code", int, what),
        stdout=_field(obj, "stdout", str, what, ""),
        stderr=_field(obj, "stderr", str, what, ""),
        timed_out=obj.get("timed_out") is True,
    )


def _chunk(obj: Mapping[str, Any], encoding: str | None) -> bytes:
    data = _field(obj, "data", str, "exec event", "")
    if encoding == "base64" or obj.get("encoding") == "base64":
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            raise InvalidResponse("exec event: 'data' is not valid base64") from None
    return data.encode("utf-8", "surrogateescape")


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
    obj = _obj(data, "exec event")
    kind = obj.get("type")
    if kind == "stdout":
        return Stdout(_chunk(obj, encoding))
    if kind == "stderr":
        return Stderr(_chunk(obj, encoding))
    if kind == "exit":
        return Exit(_field(obj, "exit_code", int, "exit event"), obj.get("timed_out") is True)
    if kind == "error":
        message = obj.get("error") or obj.get("message") or "exec failed"
        raise ServerError(str(message), 500)
    return None  # a newer daemon's event type: skip it


# -- background processes ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessInfo(_Model):
    """An entry of a sandbox's process table: a background process or a TTY session.

    ``exit_code`` and ``finished_at`` are ``None`` while it runs; TTY sessions
    have ``tty`` true and their ``session_id``; ``tag`` and ``cwd`` are as the
    process was started with them.
    """

    pid: int
    cmd: tuple[str, ...]
    running: bool
    exit_code: int | None
    started_at: datetime | None
    finished_at: datetime | None
    tty: bool = False
    session_id: str | None = None
    user: str | None = None
    tag: str | None = None
    cwd: str | None = None


def parse_process(data: Any) -> ProcessInfo:
    """A process object of ``/sandboxes/{id}/processes`` → :class:`ProcessInfo`."""
    what = "process"
    obj = _obj(data, what)
    cmd = _list(obj.get("cmd") or [], "process cmd")
    if not all(isinstance(a, str) for a in cmd):
        raise InvalidResponse("process: field 'cmd' must be a list of strings")
    pid = _opt_int(obj, "pid", what)
    if pid is None:
        raise InvalidResponse("process: field 'pid' is missing")
    return ProcessInfo(
        pid=pid,
        cmd=tuple(cmd),
        running=_field(obj, "running", bool, what, False),
        exit_code=_opt_int(obj, "exit_code", what),
        started_at=parse_time(obj.get("started_at"), "process started_at"),
        finished_at=parse_time(obj.get("finished_at"), "process finished_at"),
        tty=_field(obj, "tty", bool, what, False),
        session_id=_opt_str(obj, "session_id", what),
        user=_opt_str(obj, "user", what),
        tag=_opt_str(obj, "tag", what),
        cwd=_opt_str(obj, "cwd", what),
    )


# -- files --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileContent(_Model):
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
class FileStat(_Model):
    """``HEAD`` on a path: size, octal mode string (``"0644"``), directory or not."""

    path: str
    size: int
    mode: str
    is_dir: bool


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


def parse_sessions(data: Any) -> list[SessionInfo]:
    """A list of SessionInfo objects."""
    from kiln.protocol import InvalidMessage, SessionInfo  # noqa: PLC0415 - see above

    try:
        return [SessionInfo.from_json(item) for item in _list(data, "session list")]
    except InvalidMessage as exc:
        raise InvalidResponse(f"session list: {exc}") from exc


# -- ports ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Port(_Model):
    """A TCP port listening inside a sandbox.

    ``proxy_url`` is the daemon-relative path that relays to it (it needs the
    API key); ``published_url`` is its public URL when it is published (no key
    needed), else ``None``.
    """

    port: int
    proxy_url: str
    sandbox_id: str | None = None
    sandbox_name: str | None = None
    published_url: str | None = None


def parse_port(data: Any) -> Port:
    """A port object of ``GET /sandboxes/{id}/ports`` or ``GET /ports`` → :class:`Port`."""
    what = "port"
    obj = _obj(data, what)
    return Port(
        port=_field(obj, "port", int, what),
        proxy_url=_field(obj, "proxy_url", str, what, ""),
        sandbox_id=_opt_str(obj, "sandbox_id", what),
        sandbox_name=_opt_str(obj, "sandbox_name", what),
        published_url=_opt_str(obj, "published_url", what),
    )


@dataclass(frozen=True, slots=True)
class PublishedPort(_Model):
    """A port served without auth at ``url`` (``<alias>.<publish domain>``)."""

    id: str
    sandbox_id: str
    port: int
    alias: str
    url: str
    created_at: datetime | None


def parse_published(data: Any) -> PublishedPort:
    """A publish rule → :class:`PublishedPort`."""
    what = "published port"
    obj = _obj(data, what)
    return PublishedPort(
        id=_id(obj, what) if "id" in obj else "",
        sandbox_id=_field(obj, "sandbox_id", str, what, ""),
        port=_field(obj, "port", int, what),
        alias=_field(obj, "alias", str, what, ""),
        url=_field(obj, "url", str, what),  # the point of publishing: required
        created_at=parse_time(obj.get("created_at"), "published port created_at"),
    )


# -- secrets, volumes, templates ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Secret(_Model):
    """A secret's name and timestamps; the daemon never returns values."""

    name: str
    created_at: datetime | None = None
    updated_at: datetime | None = None


def parse_secret(data: Any) -> Secret:
    """A secret's metadata → :class:`Secret`."""
    what = "secret"
    obj = _obj(data, what)
    return Secret(
        name=_field(obj, "name", str, what),
        created_at=parse_time(obj.get("created_at"), "secret created_at"),
        updated_at=parse_time(obj.get("updated_at"), "secret updated_at"),
    )


@dataclass(frozen=True, slots=True)
class Volume(_Model):
    """A persistent ext4 volume that outlives sandboxes.

    ``attached_to`` is the sandbox using it (mounted at ``mount``), if any.
    """

    name: str
    size_mb: int
    created_at: datetime | None = None
    attached_to: str | None = None
    mount: str | None = None


def parse_volume(data: Any) -> Volume:
    """A volume object → :class:`Volume`."""
    what = "volume"
    obj = _obj(data, what)
    attached = obj.get("attached_to", obj.get("sandbox_id"))
    return Volume(
        name=_field(obj, "name", str, what),
        size_mb=_opt_int(obj, "size_mb", what) or 0,
        created_at=parse_time(obj.get("created_at"), "volume created_at"),
        attached_to=attached if isinstance(attached, str) and attached else None,
        mount=_opt_str(obj, "mount", what),
    )


@dataclass(frozen=True, slots=True)
class VolumeMount(_Model):
    """An existing volume ``name`` mounted at ``mount``."""

    name: str
    mount: str


@dataclass(frozen=True, slots=True)
class NewVolume(_Model):
    """A volume created together with the sandbox: ``size_mb`` MiB at ``mount``."""

    name: str
    size_mb: int
    mount: str


@dataclass(frozen=True, slots=True)
class Template(_Model):
    """A named sandbox spec that ``sandboxes.create(template=...)`` starts from."""

    id: str
    name: str
    cpus: int | None = None
    memory_mb: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    init: str | None = None
    image: str | None = None
    volumes: tuple[VolumeMount, ...] = ()
    created_at: datetime | None = None


def parse_volume_mount(data: Any) -> VolumeMount:
    """``{"name", "mount"}`` → :class:`VolumeMount`."""
    what = "volume mount"
    obj = _obj(data, what)
    return VolumeMount(_field(obj, "name", str, what), _field(obj, "mount", str, what))


def _id(obj: Mapping[str, Any], what: str) -> str:
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidResponse(f"{what}: field 'id' must be a string, got {value!r}")
    return str(value)


def parse_template(data: Any) -> Template:
    """A template object → :class:`Template`."""
    what = "template"
    obj = _obj(data, what)
    env = obj.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise InvalidResponse("template: field 'env' must be an object of strings")
    return Template(
        id=_id(obj, what),
        name=_field(obj, "name", str, what, ""),
        cpus=_opt_int(obj, "cpus", what),
        memory_mb=_opt_int(obj, "memory_mb", what),
        env=dict(env),
        init=_opt_str(obj, "init", what),
        image=_opt_str(obj, "image", what),
        volumes=tuple(parse_volume_mount(v) for v in _list(obj.get("volumes") or [], what)),
        created_at=parse_time(obj.get("created_at"), "template created_at"),
    )


@dataclass(frozen=True, slots=True)
class Health(_Model):
    """``GET /health``: daemon status, number of sandboxes, uptime and engines.

    ``engine`` is the default engine for new sandboxes; ``engines`` maps every
    engine the daemon knows (``qemu``, ``docker``) to ``"ok"`` when it can run
    sandboxes here, else to the reason it cannot (empty from an older daemon).
    """

    status: str
    sandboxes: int
    uptime_s: float
    engine: str
    engines: dict[str, str] = field(default_factory=dict, hash=False)


def parse_health(data: Any) -> Health:
    """``GET /health`` → :class:`Health`."""
    what = "health"
    obj = _obj(data, what)
    uptime = obj.get("uptime_s", 0.0)
    if isinstance(uptime, bool) or not isinstance(uptime, int | float):
        raise InvalidResponse(f"health: field 'uptime_s' must be a number, got {uptime!r}")
    return Health(
        status=_field(obj, "status", str, what),
        sandboxes=_opt_int(obj, "sandboxes", what) or 0,
        uptime_s=float(uptime),
        engine=_field(obj, "engine", str, what, ""),
        engines=_engines(obj.get("engines")),
    )


def _engines(value: Any) -> dict[str, str]:
    if value is None:
        return {}  # a daemon from before several engines
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidResponse("health: field 'engines' must be an object of strings")
    return dict(value)


def parse_list(data: Any, parse: Callable[[Any], T], what: str) -> list[T]:
    """Apply ``parse`` to every item of a JSON list."""
    return [parse(item) for item in _list(data, what)]
