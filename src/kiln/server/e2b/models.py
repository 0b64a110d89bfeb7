"""The JSON shapes of E2B's control plane (its OpenAPI, as the ``e2b`` SDK 2.x sends them).

Request bodies are strict, like kiln's own: a wrong type is a 422, and so is a
field kiln does not know (malformed JSON is a 400). Fields the SDK sends for
features kiln lacks are accepted only with values that ask for nothing
(``mcp: null``, ``autoResume: {"enabled": false}``, ...); anything else is
refused by :mod:`.control` (400) with a message saying what is not
supported, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kiln.api.requests import MAX_TTL_S, Env, Labels, unknown_fields_message

#: E2B's default sandbox lifetime, when a create or connect names none (its
#: OpenAPI's ``timeout`` default; the SDK omits the field unless the user set it).
DEFAULT_TIMEOUT_S = 300

#: A sandbox lifetime in seconds, counted from the request.
Timeout = Annotated[StrictInt, Field(ge=1, le=int(MAX_TTL_S))]


class _E2bBody(BaseModel):
    """E2B's field names are camelCase (``templateID``, ``envVars``): the JSON keys are
    the fields' aliases."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            unknown = [str(key) for key in data if key not in known]
            if unknown:
                message = unknown_fields_message(unknown, known)
                raise PydanticCustomError("extra_forbidden", "{message}", {"message": message})
        return data


class AutoResume(_E2bBody):
    enabled: StrictBool


class NetworkConfig(_E2bBody):
    """``network`` on create: kiln's egress policy takes ``allowOut`` and ``denyOut``."""

    allow_public_traffic: StrictBool | None = Field(default=None, alias="allowPublicTraffic")
    allow_out: list[StrictStr] | None = Field(default=None, alias="allowOut")
    deny_out: list[StrictStr] | None = Field(default=None, alias="denyOut")
    dns_servers: list[StrictStr] | None = Field(default=None, alias="dnsServers")
    egress_proxy: dict[str, Any] | None = Field(default=None, alias="egressProxy")
    mask_request_host: StrictStr | None = Field(default=None, alias="maskRequestHost")
    https_ports: list[StrictInt] | None = Field(default=None, alias="httpsPorts")
    rules: dict[str, Any] | None = Field(default=None, alias="rules")


class E2bVolumeMount(_E2bBody):
    """A kiln volume (by name) mounted at ``path``."""

    name: StrictStr
    path: StrictStr


class NewSandbox(_E2bBody):
    """``POST /v2/sandboxes`` (and the legacy ``POST /sandboxes``)."""

    template_id: StrictStr = Field(alias="templateID", min_length=1, max_length=255)
    timeout: Timeout | None = None
    auto_pause: StrictBool | None = Field(default=None, alias="autoPause")
    auto_pause_memory: StrictBool | None = Field(default=None, alias="autoPauseMemory")
    auto_resume: AutoResume | None = Field(default=None, alias="autoResume")
    allow_internet_access: StrictBool | None = Field(default=None, alias="allow_internet_access")
    network: NetworkConfig | None = None
    metadata: Labels | None = None
    env_vars: Env | None = Field(default=None, alias="envVars")
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volume_mounts: list[E2bVolumeMount] | None = Field(default=None, alias="volumeMounts")
    secure: StrictBool | None = None  # older SDKs; every kiln sandbox is secured


class ConnectSandbox(_E2bBody):
    """``POST /v2/sandboxes/{id}/connect`` (and ``/sandboxes/{id}/connect``, ``/resume``)."""

    timeout: Timeout | None = None
    memory: StrictBool | None = None
    auto_pause: StrictBool | None = Field(default=None, alias="autoPause")  # legacy resume


class PauseSandbox(_E2bBody):
    memory: StrictBool | None = None
    require_healthy_guest: StrictBool | None = Field(default=None, alias="requireHealthyGuest")


class SetTimeout(_E2bBody):
    timeout: Annotated[StrictInt, Field(ge=0, le=int(MAX_TTL_S))]


class Refresh(_E2bBody):
    duration: Annotated[StrictInt, Field(ge=0, le=int(MAX_TTL_S))] | None = None


class E2bError(BaseModel):
    """Every error under ``/e2b``: E2B's ``{"code": <HTTP status>, "message"}``."""

    code: int
    message: str


_ERROR_TEXT = {
    400: "Bad request: malformed, or a feature kiln does not have",
    401: "Missing or invalid API key",
    403: "Over quota",
    404: "Unknown sandbox or template (or another user's sandbox)",
    409: "Conflict (already paused, still being created)",
    422: "Invalid fields (wrong types, unknown fields, values out of range)",
    503: "No engine can run sandboxes here",
}

#: The error statuses documented on every E2B route.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": E2bError, "description": text} for code, text in _ERROR_TEXT.items()
}
