"""Response bodies of the HTTP API: what the daemon sends and the SDK reads.

The daemon declares them as ``response_model`` (so ``/openapi.json`` documents
every answer) and the SDK validates answers with them. Unknown fields are
ignored, so a newer daemon works with an older SDK; a field the SDK relies on
that is missing or of the wrong type fails validation. Defaults are what an
older daemon that did not send a field meant; the schema still lists every
field the daemon sends as required (``json_schema_serialization_defaults_required``).

Times are RFC 3339 strings (``2023-11-14T22:13:20.500000Z``) on the wire and
aware :class:`~datetime.datetime` objects in Python; ``to_dict()`` gives the
JSON-able form the CLI and MCP server print (``isoformat()``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError


def parse_time(value: object) -> datetime:
    """An RFC 3339 string (or unix seconds) → an aware :class:`datetime` (naive means UTC)."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    else:
        parsed = None
    if parsed is None:
        raise PydanticCustomError("rfc3339", "not an RFC 3339 time")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(value: datetime) -> str:
    """The wire form: UTC, ``Z``, microseconds when there are any."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


Timestamp = Annotated[
    datetime,
    PlainValidator(parse_time),
    PlainSerializer(format_time, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Strings = dict[StrictStr, StrictStr]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class ApiModel(BaseModel):
    """Base of every response body: unknown fields ignored, values frozen."""

    model_config = ConfigDict(
        extra="ignore", frozen=True, json_schema_serialization_defaults_required=True
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, times as ``isoformat()``."""
        out: dict[str, Any] = _jsonable(self.model_dump())
        return out

    def __hash__(self) -> int:
        # Frozen values are hashable even with a dict field (labels, env, engines).
        return hash((type(self), self.model_dump_json()))


#: "Not given" for the positional constructors below (pydantic reports what is missing).
_UNSET: Any = object()


def _init(model: BaseModel, data: dict[str, Any], **given: Any) -> None:
    """Validate keyword ``data`` plus what was ``given`` positionally: the models users
    build themselves (a policy, a volume mount) keep the dataclass constructors they had.
    Validation calls this too, with every field a keyword."""
    data.update((name, value) for name, value in given.items() if value is not _UNSET)
    BaseModel.__init__(model, **data)


class ErrorBody(ApiModel):
    """Every error answer: ``{"error": "<one line>"}``."""

    error: StrictStr


class Health(ApiModel):
    """``GET /health``: daemon status, number of sandboxes, uptime and engines.

    ``engine`` is the default engine for new sandboxes; ``engines`` maps every
    engine the daemon knows (``qemu``, ``docker``) to ``"ok"`` when it can run
    sandboxes here, else to the reason it cannot (empty from an older daemon).
    """

    status: StrictStr
    sandboxes: StrictInt = 0
    uptime_s: StrictFloat = 0.0
    engine: StrictStr = ""
    engines: Strings = Field(default_factory=dict)


# -- sandboxes ----------------------------------------------------------------------


class Capabilities(ApiModel):
    """What a sandbox's engine can do with it (ask this, not the engine's name).

    ``pause``: it can go warm (processes frozen, memory kept; resumes in
    milliseconds). ``snapshots``: its running state can be saved to disk, so it
    can go cold and a stop keeps its processes and memory; without snapshots a
    stop keeps its files but ends its processes, and a start boots it again.
    ``fork``: ``fork()`` can copy it, running processes and all.
    """

    pause: StrictBool = True
    snapshots: StrictBool = True
    fork: StrictBool = False


class NetworkPolicy(ApiModel):
    """Where a sandbox may connect outside kiln (its *egress*).

    ``allow`` and ``deny`` list IPv4 CIDRs or domain names; the first match
    decides, in the order ``allow``, ``deny``, then ``egress`` (``"allow"`` or
    ``"deny"``). ``NetworkPolicy("deny", allow=["pypi.org"])`` reaches PyPI and
    nothing else. Whatever the policy, a sandbox never reaches the host, cloud
    metadata (169.254.0.0/16), other users' sandboxes or agent ports; the daemon
    may block more (its ``firewall.blocked`` ranges, by default the private ones).
    """

    egress: StrictStr = "allow"
    allow: tuple[StrictStr, ...] = ()
    deny: tuple[StrictStr, ...] = ()

    def __init__(
        self, egress: str = _UNSET, allow: Any = _UNSET, deny: Any = _UNSET, **data: Any
    ) -> None:
        _init(self, data, egress=egress, allow=allow, deny=deny)


class LastBoot(ApiModel):
    """How a sandbox's machine came up last, and when.

    ``reason`` is ``created`` (its create), ``restored`` (from its snapshot: its
    processes and memory kept), ``started`` (booted by a start after a stop that
    ended its processes) or ``rebooted`` (its machine was lost without a snapshot,
    e.g. by a host reboot, and it booted again from its disks: files kept,
    processes lost).
    """

    reason: StrictStr
    at: Timestamp | None = None

    def __init__(self, reason: str = _UNSET, at: datetime | None = _UNSET, **data: Any) -> None:
        _init(self, data, reason=reason, at=at)


class SandboxInfo(ApiModel):
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
    up last; ``None`` from a daemon that does not say. ``node`` is the cluster node
    it lives on (``None`` on a single daemon).
    """

    id: StrictStr
    name: StrictStr
    status: StrictStr
    thermal: StrictStr = ""
    ip: StrictStr | None = None
    cpus: StrictInt = 0
    memory_mb: StrictInt = 0
    keep_hot: StrictBool = False
    engine: StrictStr = ""
    runtime: StrictStr | None = None
    capabilities: Capabilities | None = None
    image: StrictStr = ""
    created_at: Timestamp | None = None
    last_active_at: Timestamp | None = None
    labels: Strings = Field(default_factory=dict)
    network: NetworkPolicy | None = None
    expires_at: Timestamp | None = None
    on_expire: StrictStr = "destroy"
    last_boot: LastBoot | None = None
    node: StrictStr | None = None


class Port(ApiModel):
    """A TCP port listening inside a sandbox.

    ``proxy_url`` is the daemon-relative path that relays to it (it needs the
    API key); ``published_url`` is its public URL when it is published (no key
    needed), else ``None``.
    """

    port: StrictInt
    proxy_url: StrictStr = ""
    published_url: StrictStr | None = None
    sandbox_id: StrictStr | None = None
    sandbox_name: StrictStr | None = None


class PublishedPort(ApiModel):
    """A port served without auth at ``url`` (``<alias>.<publish domain>``)."""

    id: StrictStr = ""
    sandbox_id: StrictStr = ""
    port: StrictInt
    alias: StrictStr = ""
    url: StrictStr
    created_at: Timestamp | None = None


class SessionInfo(ApiModel):
    """An exec or TTY session of a sandbox's agent (``created_at`` in unix seconds)."""

    session_id: StrictStr
    argv: StrictStr = ""
    tty: StrictBool = False
    running: StrictBool = False
    attached: StrictBool = False
    created_at: float = 0.0
    exit_code: StrictInt | None = None


# -- exec and processes ---------------------------------------------------------------


class ExecResult(ApiModel):
    """The outcome of a buffered exec: exit code and the whole output.

    Output is decoded as UTF-8 (invalid bytes replaced) unless the request asked
    for ``"encoding": "base64"`` (then ``encoding`` says so); use
    :meth:`Sandbox.exec_stream` for raw bytes. ``timed_out`` is true when the
    daemon killed the command at ``timeout_s`` (exit code 124).
    """

    # encoding and timed_out are sent only when they apply.
    model_config = ConfigDict(json_schema_serialization_defaults_required=False)

    exit_code: StrictInt
    stdout: StrictStr = ""
    stderr: StrictStr = ""
    encoding: Literal["base64"] | None = None
    timed_out: StrictBool = False

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.encoding is None:
            del out["encoding"]
        return out


class OutputEvent(ApiModel):
    """A chunk of output of a streamed exec or a process (``data`` in base64 when asked)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=False)

    type: Literal["stdout", "stderr"]
    data: StrictStr = ""
    encoding: Literal["base64"] | None = None


class ExitEvent(ApiModel):
    """The command ended: always the last line of a stream."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=False)

    type: Literal["exit"]
    exit_code: StrictInt
    timed_out: StrictBool = False


class ErrorEvent(ApiModel):
    """The daemon failed mid-stream (the status line was already sent)."""

    type: Literal["error"]
    error: StrictStr


#: One NDJSON line of ``POST /sandboxes/{id}/exec`` (streamed) or ``.../processes/{pid}/output``.
ExecEvent = Annotated[OutputEvent | ExitEvent | ErrorEvent, Field(discriminator="type")]


class ProcessInfo(ApiModel):
    """An entry of a sandbox's process table: a background process or a TTY session.

    ``exit_code`` and ``finished_at`` are ``None`` while it runs; TTY sessions
    have ``tty`` true and their ``session_id``; ``tag`` and ``cwd`` are as the
    process was started with them.
    """

    pid: StrictInt
    cmd: tuple[StrictStr, ...] = ()
    running: StrictBool = False
    exit_code: StrictInt | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    tty: StrictBool = False
    session_id: StrictStr | None = None
    user: StrictStr | None = None
    tag: StrictStr | None = None
    cwd: StrictStr | None = None


# -- files --------------------------------------------------------------------------


class FileEntry(ApiModel):
    """A FileInfo of the wire protocol (:class:`kiln.protocol.FileInfo`), as listings,
    moves and the SDK's ``Files.list`` carry it; the optional fields are sent only
    when known."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=False)

    name: StrictStr
    size: StrictInt
    mode: StrictStr
    is_dir: StrictBool
    mtime: float
    path: StrictStr | None = None
    type: Literal["file", "dir", "symlink", "other"] | None = None
    target: StrictStr | None = None
    uid: StrictInt | None = None
    gid: StrictInt | None = None
    owner: StrictStr | None = None
    group: StrictStr | None = None
    permissions: StrictStr | None = None
    symlink: StrictBool = False


class ListingCap(ApiModel):
    """The last entry of a listing cut short: how many entries there were."""

    name: Literal["..."]
    truncated: Literal[True]
    total: StrictInt


class FileWritten(ApiModel):
    """``PUT /sandboxes/{id}/files``: the path and the bytes written."""

    path: StrictStr
    size: StrictInt


class ArchiveExtracted(ApiModel):
    """``PUT /sandboxes/{id}/archive``: the directory and how many members went in."""

    path: StrictStr
    members: StrictInt


class DirMade(ApiModel):
    """``POST /sandboxes/{id}/files/mkdir``: ``created`` false when it existed."""

    path: StrictStr
    created: StrictBool


class FileChange(ApiModel):
    """One NDJSON line of a watch: ``type`` create, write, remove, rename or chmod;
    ``name`` relative to the watched directory."""

    name: StrictStr
    type: StrictStr


# -- secrets, volumes, templates ------------------------------------------------------


class Secret(ApiModel):
    """A secret's name and timestamps; the daemon never returns values."""

    name: StrictStr
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None


class NodeInfo(ApiModel):
    """A node of a cluster (daemons sharing a PostgreSQL store).

    ``state`` is what an admin asked (``active`` or ``draining``: takes no new
    sandboxes); ``status`` is ``lost`` once its lease ran out unrenewed, else its
    state. ``cpus``/``memory_mb`` are what it offers; ``cpus_allocated`` and
    ``memory_allocated_mb`` what its ``sandboxes`` live ones take; ``starting`` the
    creates placed on it and not finished yet; ``lease_left_s`` how long until it is
    lost unless renewed (negative: lost that long ago); ``load`` the host's 1-minute
    load average at the last renewal.
    """

    name: StrictStr
    address: StrictStr
    engines: list[StrictStr] = Field(default_factory=list)
    cpus: StrictInt = 0
    memory_mb: StrictInt = 0
    disk_mb: StrictInt = 0
    load: float = 0.0
    state: StrictStr = "active"
    status: StrictStr = "active"
    sandboxes: StrictInt = 0
    cpus_allocated: StrictInt = 0
    memory_allocated_mb: StrictInt = 0
    starting: StrictInt = 0
    lease_left_s: float = 0.0
    registered_at: Timestamp | None = None


class Volume(ApiModel):
    """A persistent ext4 volume that outlives sandboxes.

    ``attached_to`` is the sandbox using it (mounted at ``mount``), if any.
    """

    id: StrictStr = ""
    name: StrictStr
    size_mb: StrictInt = 0
    created_at: Timestamp | None = None
    attached_to: StrictStr | None = None
    mount: StrictStr | None = None


class VolumeMount(ApiModel):
    """An existing volume ``name`` mounted at ``mount``."""

    name: StrictStr
    mount: StrictStr

    def __init__(self, name: str = _UNSET, mount: str = _UNSET, **data: Any) -> None:
        _init(self, data, name=name, mount=mount)


class SavedImage(ApiModel):
    """A sandbox saved as an image, private to its owner: ``sandboxes.create(
    saved_image=name)`` starts from it.

    ``memory``: its memory is in it too, so sandboxes made from it start with the
    saved sandbox's processes running (QEMU); else only its files (Docker).
    ``image`` is the image tier it came from; ``cpus`` and ``memory_mb`` its shape.
    """

    id: StrictStr
    name: StrictStr
    engine: StrictStr = ""
    image: StrictStr = ""
    cpus: StrictInt = 1
    memory_mb: StrictInt = 0
    size_bytes: StrictInt = 0
    memory: StrictBool = False
    source_id: StrictStr = ""
    created_at: Timestamp | None = None


class ImageInfo(ApiModel):
    """An image a sandbox can start from (``image`` on create).

    ``kind``: ``tier`` (built into kiln), ``packages`` (a package-list build),
    ``dockerfile`` or ``saved``. ``scope``: ``builtin``, ``global`` (an admin's
    build, visible to all) or ``user`` (the caller's own). ``ref``: the name
    the engines and sandbox rows use. ``size_bytes``: disk the image occupies
    (what counts against the owner's image quota).
    """

    name: StrictStr
    kind: StrictStr
    scope: StrictStr
    ref: StrictStr = ""
    digest: StrictStr = ""
    size_bytes: StrictInt = 0
    packages: tuple[StrictStr, ...] = ()
    files: tuple[StrictStr, ...] = ()
    env: Strings = Field(default_factory=dict)
    created_at: Timestamp | None = None


class ImageBuildEvent(ApiModel):
    """One NDJSON line of ``POST /images`` with ``Accept: application/x-ndjson``:
    ``progress`` lines (``message``, ``elapsed_s``), then one ``image`` line
    (``image``) or one ``error`` line (``message``, ``status``)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=False)

    type: StrictStr
    message: StrictStr | None = None
    elapsed_s: StrictFloat | None = None
    image: ImageInfo | None = None
    status: StrictInt | None = None


class Template(ApiModel):
    """A named sandbox spec that ``sandboxes.create(template=...)`` starts from."""

    id: StrictStr
    name: StrictStr = ""
    cpus: StrictInt | None = None
    memory_mb: StrictInt | None = None
    env: Strings = Field(default_factory=dict)
    init: StrictStr | None = None
    image: StrictStr | None = None
    volumes: tuple[VolumeMount, ...] = ()
    created_at: Timestamp | None = None
