"""Request bodies of the HTTP API (pydantic, strict), and the shared name rules.

Types are strict: ``"cpus": "2"`` or ``"keep_hot": 1`` is a 422, not silently
coerced. So is a field the route does not know: a typo (``"memory"`` for
``"memory_mb"``) or an option this daemon lacks must fail loudly rather than be
ignored and leave the client believing it took effect. Responses are in
:mod:`.responses`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kiln.engine.base import MAX_CPUS, MIN_MEMORY_MB
from kiln.protocol import ROOT_USER, SANDBOX_USER

#: Sandbox, template and volume names (and what a path segment may hold).
NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)
#: Secret names become environment variable names inside the sandbox.
SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
SECRET_NAME_RE = re.compile(SECRET_NAME_PATTERN)
MAX_MEMORY_MB = 1 << 20  # 1 TiB
MAX_VOLUME_MB = 1 << 22  # 4 TiB
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_TTL_S = 10 * 366 * 24 * 3600.0  # ten years: "forever" is null, not a huge number

Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN)]
Cpus = Annotated[StrictInt, Field(ge=1, le=MAX_CPUS)]
MemoryMb = Annotated[StrictInt, Field(ge=MIN_MEMORY_MB, le=MAX_MEMORY_MB)]
SizeMb = Annotated[StrictInt, Field(ge=1, le=MAX_VOLUME_MB)]
MountPoint = Annotated[StrictStr, Field(pattern=r"^/[^\x00]*[^/\x00]$", max_length=4096)]
Env = dict[Annotated[StrictStr, Field(min_length=1, pattern=r"^[^=\x00]+$")], StrictStr]
# Types only here; key and value rules live in kiln.store.check_labels (one message style).
Labels = dict[StrictStr, StrictStr]
TtlS = Annotated[StrictFloat, Field(gt=0, le=MAX_TTL_S)]
OnExpireName = Literal["destroy", "stop"]


#: Who a command may run as: root, or the image's sandbox user (the default).
EXEC_USERS = (ROOT_USER, SANDBOX_USER)


def exec_user_error(value: object) -> str | None:
    """Why ``value`` is not a user a command may run as; None when it is one."""
    if isinstance(value, str) and value in EXEC_USERS:
        return None
    return f"must be {ROOT_USER!r} or {SANDBOX_USER!r} (the default), got {value!r}"


def _exec_user(value: object) -> str:
    error = exec_user_error(value)
    if error is not None:
        # A custom error type: pydantic would prefix a ValueError's text with "Value error, ".
        raise PydanticCustomError("exec_user", "{error}", {"error": error})
    assert isinstance(value, str)
    return value


ExecUser = Annotated[
    str,
    PlainValidator(_exec_user),
    WithJsonSchema({"type": "string", "enum": list(EXEC_USERS)}),
]


def agent_user(user: str | None) -> str | None:
    """The ExecRequest ``user`` for a validated :data:`ExecUser`.

    The sandbox user is sent as None, the agent's own default: that is the user
    the sandbox was configured with, whatever the agent is told its name is
    (a test-mode agent runs as whoever started it).
    """
    return ROOT_USER if user == ROOT_USER else None


def unknown_fields_message(unknown: Iterable[str], known: Iterable[str]) -> str:
    """``unknown field 'memory' (did you mean 'memory_mb'?); known fields: ...``."""
    known = list(known)
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    noun = "field" if len(parts) == 1 else "fields"
    return f"unknown {noun} {', '.join(parts)}; known fields: {', '.join(known)}"


class _Body(BaseModel):
    # "forbid" also puts additionalProperties: false in the OpenAPI schema; the
    # check below runs first and gives the clearer message.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [str(key) for key in data if key not in cls.model_fields]
            if unknown:
                message = unknown_fields_message(unknown, cls.model_fields)
                raise PydanticCustomError("extra_forbidden", "{message}", {"message": message})
        return data


NetworkTarget = Annotated[StrictStr, Field(min_length=1, max_length=253)]


class NetworkBody(_Body):
    """A sandbox's egress policy (:mod:`kiln.network.policy`): ``allow`` wins over
    ``deny``, both over ``egress``. Entries are IPv4 CIDRs or domain names."""

    egress: Literal["allow", "deny"] | None = None
    allow: Annotated[list[NetworkTarget], Field(max_length=256)] | None = None
    deny: Annotated[list[NetworkTarget], Field(max_length=256)] | None = None


class VolumeMountBody(_Body):
    name: Name
    mount: MountPoint


class NewVolumeBody(_Body):
    name: Name
    size_mb: SizeMb
    mount: MountPoint


class CreateSandbox(_Body):
    name: Name | None = None
    cpus: Cpus | None = None
    memory_mb: MemoryMb | None = None
    env: Env | None = None
    secrets: list[Annotated[StrictStr, Field(pattern=SECRET_NAME_PATTERN)]] | None = None
    init: StrictStr | None = None
    keep_hot: StrictBool | None = None
    template_id: StrictStr | None = None
    image: Name | None = None
    volumes: list[VolumeMountBody] | None = None
    new_volumes: list[NewVolumeBody] | None = None
    labels: Labels | None = None
    ttl_s: TtlS | None = None  # None: no expiry
    on_expire: OnExpireName | None = None  # None: destroy
    engine: Literal["qemu", "docker"] | None = None  # None: the daemon's default
    runtime: Literal["runc", "runsc"] | None = None  # docker only; None: its default
    network: NetworkBody | None = None  # None: the daemon's default policy
    #: Start from the caller's saved image of this name (``POST /sandboxes/{id}/save``):
    #: its disk and, where its engine can, its running processes. The sandbox has the
    #: saved one's image, shape, engine, env and init; giving other ones is a 422.
    saved_image: Name | None = None


class SaveSandbox(_Body):
    """The saved image's name (unique among the caller's saved images)."""

    name: Name


class ForkSandbox(_Body):
    """The copy's name (default: its id); everything else is the source's."""

    name: Name | None = None


class PatchSandbox(_Body):
    """Absent fields are left alone; ``"ttl_s": null`` removes the expiry (see
    ``model_fields_set``), ``"labels"`` replaces the whole label set."""

    name: Name | None = None
    keep_hot: StrictBool | None = None
    labels: Labels | None = None
    ttl_s: TtlS | None = None
    on_expire: OnExpireName | None = None


SandboxPath = Annotated[StrictStr, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]


class MkdirBody(_Body):
    """``POST /sandboxes/{id}/files/mkdir``: a directory (and, with ``parents``, the
    missing ones above it); ``mode`` an octal string such as ``"0755"``."""

    path: SandboxPath
    parents: StrictBool = True
    mode: Annotated[StrictStr, Field(pattern=r"^0?[0-7]{1,4}$")] | None = None


class MoveBody(_Body):
    """``POST /sandboxes/{id}/files/move``: rename ``source`` to ``destination``
    (across directories; an existing destination only with ``overwrite``)."""

    source: SandboxPath
    destination: SandboxPath
    overwrite: StrictBool = False


class ExecBody(_Body):
    cmd: Annotated[list[StrictStr], Field(min_length=1)]
    env: Env | None = None
    cwd: StrictStr | None = None
    timeout_s: Annotated[StrictFloat, Field(gt=0, le=MAX_TIMEOUT_S)] | None = None
    encoding: Literal["utf-8", "base64"] | None = None
    stdin: StrictStr | None = None
    user: ExecUser | None = Field(
        default=None, description=f"{ROOT_USER!r}, or {SANDBOX_USER!r} (the default)"
    )


#: Rows or columns of a terminal.
TermSize = Annotated[StrictInt, Field(ge=1, le=0xFFFF)]


class StartProcess(_Body):
    cmd: Annotated[list[StrictStr], Field(min_length=1)]
    env: Env | None = None
    cwd: StrictStr | None = None
    user: ExecUser | None = Field(
        default=None, description=f"{ROOT_USER!r}, or {SANDBOX_USER!r} (the default)"
    )
    stdin: StrictBool = Field(
        default=True, description="false: stdin is at end-of-file from the start"
    )
    tag: Annotated[StrictStr, Field(max_length=256)] | None = Field(
        default=None, description="A name of your choosing, listed with the process"
    )
    tty: StrictBool = Field(
        default=False, description="Run it on a terminal (its output is all stdout)"
    )
    rows: TermSize | None = None
    cols: TermSize | None = None

    @model_validator(mode="after")
    def _size_needs_a_terminal(self) -> StartProcess:
        if not self.tty and (self.rows is not None or self.cols is not None):
            raise PydanticCustomError("tty_size", "rows and cols need tty: true")
        return self


class ResizeProcess(_Body):
    rows: TermSize
    cols: TermSize


class SignalProcess(_Body):
    signal: StrictStr = Field(description="TERM, KILL, INT, HUP, QUIT, USR1 or USR2")


class CreateTemplate(_Body):
    name: Name
    cpus: Cpus = 1
    memory_mb: MemoryMb = 512
    env: Env | None = None
    init: StrictStr | None = None
    image: Name | None = None
    volumes: list[VolumeMountBody] | None = None


class PutSecret(_Body):
    name: Annotated[StrictStr, Field(pattern=SECRET_NAME_PATTERN)]
    value: StrictStr


class CreateVolume(_Body):
    name: Name
    size_mb: SizeMb


class ImageFileBody(_Body):
    """A file written into the image (owned by root)."""

    path: Annotated[StrictStr, Field(min_length=2, max_length=4096)]
    content: StrictStr
    mode: Annotated[StrictStr, Field(pattern=r"^0?[0-7]{3,4}$")] = "0644"


#: Largest ``context`` of a Dockerfile image: base64 of a 16 MiB tar.
MAX_CONTEXT_BASE64 = (16 << 20) * 4 // 3 + 4


class CreateImage(_Body):
    """A package-list image: Debian ``packages`` and ``files`` on top of ``minimal``;
    or a Dockerfile image: ``dockerfile`` (its text, ``FROM minimal``) and its build
    ``context`` (a tar archive, base64, at most 16 MiB), built by the Docker
    engine's dockerd.

    Checked further by :func:`kiln.images.definition.from_json` (names, paths,
    sizes; 422 with the field named)."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=40)]
    packages: Annotated[list[StrictStr], Field(max_length=200)] = Field(default_factory=list)
    files: Annotated[list[ImageFileBody], Field(max_length=100)] = Field(default_factory=list)
    env: Env = Field(default_factory=dict)
    dockerfile: Annotated[StrictStr, Field(min_length=1, max_length=65536)] | None = None
    context: Annotated[StrictStr, Field(max_length=MAX_CONTEXT_BASE64)] | None = None


#: A published port's alias: one DNS label (it becomes ``<alias>.<publish domain>``).
ALIAS_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
ALIAS_RE = re.compile(ALIAS_PATTERN)
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def _check_alias(value: str) -> str:
    if not ALIAS_RE.match(value):
        raise PydanticCustomError(
            "alias",
            "must be one lowercase DNS label: 1 to 63 of a-z, 0-9 and '-', "
            "not starting or ending with '-' (got '{value}')",
            {"value": value},
        )
    return value


Alias = Annotated[StrictStr, AfterValidator(_check_alias)]


class PublishPort(_Body):
    port: Port
    alias: Alias | None = Field(
        default=None,
        description="a lowercase DNS label; generated from the sandbox name when absent",
    )
