"""Request bodies of the HTTP API (pydantic, strict), and the shared name rules.

Types are strict: ``"cpus": "2"`` or ``"keep_hot": 1`` is a 422, not silently
coerced. Unknown fields are ignored, so an older daemon accepts a newer
client's extra options. Responses are plain dicts built in :mod:`.views`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from kiln.engine.base import MAX_CPUS, MIN_MEMORY_MB

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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


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


class PatchSandbox(_Body):
    """Absent fields are left alone; ``"ttl_s": null`` removes the expiry (see
    ``model_fields_set``), ``"labels"`` replaces the whole label set."""

    name: Name | None = None
    keep_hot: StrictBool | None = None
    labels: Labels | None = None
    ttl_s: TtlS | None = None
    on_expire: OnExpireName | None = None


class ExecBody(_Body):
    cmd: Annotated[list[StrictStr], Field(min_length=1)]
    env: Env | None = None
    cwd: StrictStr | None = None
    timeout_s: Annotated[StrictFloat, Field(gt=0, le=MAX_TIMEOUT_S)] | None = None
    encoding: Literal["utf-8", "base64"] | None = None
    stdin: StrictStr | None = None


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


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": "<one line>"}``."""

    error: str


_ERROR_CODES = {
    400: "Bad input (malformed JSON, a bad query value)",
    401: "Missing or wrong API key",
    403: "Over quota, or not yours",
    404: "Unknown sandbox, template, secret, volume or session",
    409: "Conflict (name taken, volume in use)",
    413: "Body too large",
    422: "Invalid fields",
    503: "No engine can run sandboxes here",
}

#: Documented on every route, so the OpenAPI schema tells the truth about errors
#: (and replaces FastAPI's default 422 schema, which kiln never sends).
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody, "description": text} for code, text in _ERROR_CODES.items()
}
