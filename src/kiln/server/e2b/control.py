"""E2B's control plane under ``/e2b``: its sandbox routes, mapped onto kiln's services.

    E2B                                   kiln
    POST /v2/sandboxes                    create (templateID → image or template,
                                          metadata → labels, envVars → env,
                                          timeout → ttl, autoPause → on_expire stop)
    GET  /v2/sandboxes, GET /sandboxes    list (metadata, state, template, paging)
    GET  /sandboxes/{id}                  get
    DELETE /sandboxes/{id}                destroy
    POST /sandboxes/{id}/pause            stop (QEMU keeps memory and processes)
    POST /v2/sandboxes/{id}/connect       start if stopped; ttl
    POST /sandboxes/{id}/connect, /resume (older SDKs' connect and resume)
    POST /sandboxes/{id}/timeout          ttl, counted from now
    GET  /sandboxes/{id}/metrics          [] (kiln keeps no metrics history)

E2B's ``paused`` is kiln's ``stopped``; every other live state (hot, warm or
cold) is ``running``. Users see and touch only their own sandboxes: another
user's is 404, as an unknown one. Errors are E2B's ``{"code", "message"}``
(:func:`error_response`; the app uses it for every path under ``/e2b``), with
the statuses the SDK maps to its exceptions: 401 → ``AuthenticationException``,
404 → ``NotFoundException`` / ``SandboxNotFoundException`` (or ``kill()`` →
False), 409 on pause → ``pause()`` → False. The SDK's features kiln lacks
(snapshots, fork, network updates, MCP, IAM, logs, and E2B's template, volume
and secret APIs) answer 400 saying so rather than 404, which the SDK would
report as a missing sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import urllib.parse
import weakref
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from kiln.api.requests import CreateSandbox, PatchSandbox
from kiln.engine.base import Status
from kiln.images import TIERS
from kiln.store import NotFound, OnExpire, User, rfc3339
from kiln.store import Sandbox as SandboxRow

from ..auth import authenticate, bearer_token, services_of
from ..errors import (
    ApiError,
    BadRequest,
    ConflictError,
    NotFoundError,
    Unauthorized,
    Unprocessable,
)
from ..routes.deps import AppServices
from ..services import Services
from .models import (
    DEFAULT_TIMEOUT_S,
    ERROR_RESPONSES,
    ConnectSandbox,
    NewSandbox,
    PauseSandbox,
    SetTimeout,
)
from .users import E2B_USER

PREFIX = "/e2b"

#: The envd version kiln reports: the SDK turns features on and off by it
#: (``e2b/envd/versions.py``). 0.5.7 is the highest whose features kiln serves:
#: the SDK leaves the default user to the sandbox (≥ 0.4.0: kiln's is ``user``),
#: may close a command's stdin (≥ 0.5.2) and upload with
#: ``application/octet-stream`` (≥ 0.5.7), and watches directories recursively
#: (≥ 0.1.4). 0.6.2 would let it send file metadata (extended attributes),
#: 0.6.3 ask for entry info in watch events and 0.6.4 watch network mounts,
#: none of which kiln's agent does; below 0.6.2 the SDK refuses those itself,
#: with a clear TemplateException, instead of kiln failing them later.
ENVD_VERSION = "0.5.7"

#: ``clientID`` in E2B's answers (one per cluster node there; kiln has one daemon).
CLIENT_ID = "kiln"
#: E2B's default template name: kiln's default image.
DEFAULT_TEMPLATE = "base"
#: ``endAt`` of a sandbox without an expiry (E2B's field is required): far away,
#: and still a valid datetime in every time zone.
NO_END = "9999-01-01T00:00:00Z"
#: The most a list page holds (and its default): E2B's own bounds.
MAX_PAGE = 100


def error_response(status: int, message: str) -> JSONResponse:
    """An E2B error (the statuses are kiln's: 400 malformed, 422 invalid fields, ...);
    a 5xx tells the SDK's retry logic not to retry: kiln's (no engine, an agent
    that does not answer) do not pass in the SDK's few seconds of back-off."""
    headers = {"Should-Retry": "false"} if status >= 500 else None
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


class NotSupported(ApiError):
    """A feature of E2B's API kiln does not have: a 400 (asking for it is bad input
    here, and no 5xx answers bad input), which the SDK raises as
    ``SandboxException("400: ... not supported ...")``; a 404 would read as a
    missing sandbox, a 501 as a server fault its callers might retry."""

    status = 400


# ------------------------------------------------------------------------ auth


async def e2b_user(request: Request) -> User:
    """The user owning the request's API key: E2B's ``X-API-KEY`` header (what the SDK
    sends) or kiln's ``Authorization: Bearer``."""
    key = request.headers.get("x-api-key") or bearer_token(request.headers)
    if not key:
        raise Unauthorized("missing API key: send it as 'X-API-KEY: <kiln API key>'")
    return authenticate(services_of(request), key)


E2bUser = Annotated[User, Depends(e2b_user)]

router = APIRouter(prefix=PREFIX, tags=["e2b"], responses=ERROR_RESPONSES)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "missing":
            msg = "field required"
        if err.get("type") == "model_attributes_type" and not where:
            msg = "request body must be a JSON object"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


# ------------------------------------------------------------------------ views


def _state(status: str) -> str:
    return "paused" if status == Status.STOPPED else "running"


def _template_of(sb: SandboxRow) -> str:
    return sb.config.template or sb.image


def _end_at(sb: SandboxRow) -> str:
    return NO_END if sb.expires_at is None else rfc3339(sb.expires_at)


def listed(sb: SandboxRow, view: dict[str, Any]) -> dict[str, Any]:
    """E2B's ``ListedSandbox`` for a row and its kiln view."""
    return {
        "templateID": _template_of(sb),
        "alias": _template_of(sb),
        "sandboxID": sb.id,
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(sb.created_at),
        "endAt": _end_at(sb),
        "cpuCount": sb.cpus,
        "memoryMB": sb.memory_mb,
        # Not tracked per sandbox (the image decides the root disk); 0: unknown.
        "diskSizeMB": 0,
        "state": _state(view["status"]),
        "envdVersion": ENVD_VERSION,
        "metadata": dict(sb.labels),
        "volumeMounts": [{"name": v.name, "path": v.mount} for v in sb.config.volumes],
    }


def detail(sb: SandboxRow, view: dict[str, Any], token: str) -> dict[str, Any]:
    """E2B's ``SandboxDetail``: the listed fields, the envd token and the lifecycle."""
    out = listed(sb, view)
    out["envdAccessToken"] = token
    out["domain"] = None
    network = view.get("network") or {}
    asked = sb.config.network is not None
    out["allowInternetAccess"] = network.get("egress") == "allow" if asked else None
    out["lifecycle"] = {
        "autoResume": False,
        "onTimeout": "pause" if sb.on_expire is OnExpire.STOP else "kill",
    }
    if out["state"] == "paused":
        snapshots = (view.get("capabilities") or {}).get("snapshots", True)
        out["pauseMode"] = "full" if snapshots else "filesystem"
    return out


def created(sb: SandboxRow, token: str) -> dict[str, Any]:
    """E2B's ``Sandbox``: what create and connect answer."""
    return {
        "templateID": _template_of(sb),
        "alias": _template_of(sb),
        "sandboxID": sb.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": None,
        "domain": None,
    }


# ------------------------------------------------------------------------ create


def _is_image(services: Services, user: User, name: str) -> bool:
    """Whether ``name`` is an image of the catalog ``user`` sees (theirs or global)."""
    try:
        services.store.find_image(user.id, name)
    except NotFound:
        return False
    return True


def _kiln_create(user: User, services: Services, body: NewSandbox) -> CreateSandbox:
    """The kiln create an E2B create asks for; 400 or 404 for what kiln cannot do."""
    fields: dict[str, Any] = {}
    template = body.template_id
    if template == DEFAULT_TEMPLATE:
        pass  # the daemon's default image
    elif template in TIERS:
        fields["image"] = template
    else:
        try:
            fields["template_id"] = services.templates.find(user, template).id
        except (NotFound, NotFoundError):
            if not _is_image(services, user, template):
                known = ", ".join([DEFAULT_TEMPLATE, *sorted(TIERS)])
                raise NotFoundError(
                    f"template {template!r} not found: use {known} (kiln images), one of"
                    " your images or the id or name of one of your kiln templates"
                ) from None
            fields["image"] = template
    if body.mcp:
        raise NotSupported("mcp is not supported by kiln (no MCP gateway in its images)")
    if body.iam:
        raise NotSupported("iam (workload identity tokens) is not supported by kiln")
    if body.auto_resume is not None and body.auto_resume.enabled:
        raise NotSupported(
            "autoResume is not supported by kiln: resume a paused sandbox with connect"
        )
    if body.auto_pause and body.auto_pause_memory is False:
        raise NotSupported(
            "autoPauseMemory false (a filesystem-only pause) is not supported by kiln:"
            " a pause keeps the memory where the engine can"
        )
    network = _network(body)
    if network is not None:
        fields["network"] = network
    if body.metadata:
        fields["labels"] = dict(body.metadata)
    if body.env_vars:
        fields["env"] = dict(body.env_vars)
    if body.volume_mounts:
        fields["volumes"] = [{"name": v.name, "mount": v.path} for v in body.volume_mounts]
    fields["ttl_s"] = float(body.timeout if body.timeout is not None else DEFAULT_TIMEOUT_S)
    fields["on_expire"] = "stop" if body.auto_pause else "destroy"
    try:
        return CreateSandbox.model_validate(fields)
    except ValidationError as exc:
        raise Unprocessable(_validation_message(exc)) from None


def _network(body: NewSandbox) -> dict[str, Any] | None:
    """kiln's egress policy for ``allow_internet_access`` and ``network``."""
    net = body.network
    if net is not None:
        unsupported = [
            name
            for name, value in (
                ("egressProxy", net.egress_proxy),
                ("maskRequestHost", net.mask_request_host),
                ("httpsPorts", net.https_ports),
                ("rules", net.rules),
                ("dnsServers", net.dns_servers),
            )
            if value
        ]
        if net.allow_public_traffic:
            unsupported.append("allowPublicTraffic")
        if unsupported:
            raise NotSupported(f"network: {', '.join(unsupported)} not supported by kiln")
    allow = list(net.allow_out or ()) if net else []
    deny = list(net.deny_out or ()) if net else []
    egress = None
    if body.allow_internet_access is not None:
        egress = "allow" if body.allow_internet_access else "deny"
    if "0.0.0.0/0" in deny:  # E2B's spelling of "no internet" (the SDK's own mapping)
        deny = [d for d in deny if d != "0.0.0.0/0"]
        egress = "deny"
    if egress is None and not allow and not deny:
        return None
    return {"egress": egress or "allow", "allow": allow, "deny": deny}


#: An ``Idempotency-Key`` as the SDK accepts one.
IDEMPOTENCY_KEY_RE = re.compile(r"^[a-z0-9-]{1,255}$")
#: One lock per (user, key) while a create with that key runs: a retry waits for
#: it and then finds its sandbox instead of making a second one.
_creating: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
    weakref.WeakValueDictionary()
)


@router.post("/v2/sandboxes", status_code=201)
@router.post("/sandboxes", status_code=201, include_in_schema=False)
async def create_sandbox(
    new: NewSandbox,
    user: E2bUser,
    services: AppServices,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="a retry with it gets the same sandbox"),
    ] = None,
) -> dict[str, Any]:
    """Create a sandbox (E2B ``NewSandbox``) → E2B ``Sandbox``, with its envd token.

    With an ``Idempotency-Key``, a create repeated with the same key and request
    answers the sandbox the first one made while that sandbox lives (409 if the
    key comes with another request)."""
    create = _kiln_create(user, services, new)
    if idempotency_key is None:
        row = await services.sandboxes.create_row(
            user, create, guest_user=E2B_USER, template_name=new.template_id
        )
        return created(row, services.envd_tokens.issue(row.id))
    if not IDEMPOTENCY_KEY_RE.match(idempotency_key):
        raise BadRequest("Idempotency-Key: 1 to 255 lowercase letters, digits or '-'")
    request = json.dumps(new.model_dump(mode="json", by_alias=True), sort_keys=True)
    digest = hashlib.sha256(request.encode()).hexdigest()
    lock = _creating.get((user.id, idempotency_key))
    if lock is None:
        lock = _creating[(user.id, idempotency_key)] = asyncio.Lock()
    async with lock:
        for sb in services.store.list_sandboxes(user.id):
            earlier = sb.config.idempotency
            if earlier is not None and earlier.get("key") == idempotency_key:
                if earlier.get("digest") != digest:
                    raise ConflictError(
                        f"Idempotency-Key {idempotency_key!r} was used for another request"
                    )
                return created(sb, services.envd_tokens.issue(sb.id))
        row = await services.sandboxes.create_row(
            user,
            create,
            guest_user=E2B_USER,
            template_name=new.template_id,
            idempotency={"key": idempotency_key, "digest": digest},
        )
    return created(row, services.envd_tokens.issue(row.id))


# ------------------------------------------------------------------------ list


def _metadata_filter(value: str | None) -> dict[str, str]:
    """The SDK's ``metadata`` query: ``urlencode`` of percent-quoted keys and values."""
    if not value:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(value, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise BadRequest(f"metadata: not a query string of key=value pairs: {value!r}") from None
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def _states(value: str | None) -> set[str]:
    if not value:
        return {"running", "paused"}
    states = {s.strip() for s in value.split(",") if s.strip()}
    bad = states - {"running", "paused"}
    if bad:
        raise BadRequest(f"state: {sorted(bad)[0]!r} is not 'running' or 'paused'")
    return states


def _started_after(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"startedAfter: not an RFC 3339 time: {value!r}") from None
    if when.tzinfo is None:
        raise BadRequest(f"startedAfter: {value!r} has no time zone")
    return when


def _started(sb: SandboxRow) -> datetime:
    """``startedAt`` as answered (to the microsecond): a client's ``startedAfter`` of
    a sandbox's own ``startedAt`` includes it."""
    return datetime.fromtimestamp(sb.created_at, UTC)


def _encode_token(sb: SandboxRow) -> str:
    raw = json.dumps([sb.created_at, sb.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, sandbox_id = json.loads(raw)
        if isinstance(created_at, bool) or not isinstance(created_at, int | float):
            raise TypeError
        if not isinstance(sandbox_id, str):
            raise TypeError
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise BadRequest(f"nextToken: {token!r} is not a token this API gave out") from None
    return float(created_at), sandbox_id


def _page(
    services: Services,
    user: User,
    *,
    metadata: str | None,
    state: str | None,
    order: str | None,
    started_after: str | None,
    template: str | None,
    next_token: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    wanted_labels = _metadata_filter(metadata)
    states = _states(state)
    after = _started_after(started_after)
    if order not in (None, "asc", "desc"):
        raise BadRequest(f"order: must be 'asc' or 'desc', got {order!r}")
    descending = order == "desc"
    cursor = _decode_token(next_token) if next_token else None
    rows = sorted(
        services.store.list_sandboxes(user.id, labels=wanted_labels),
        key=lambda sb: (sb.created_at, sb.id),
        reverse=descending,
    )
    page: list[tuple[SandboxRow, dict[str, Any]]] = []
    for sb in rows:
        key = (sb.created_at, sb.id)
        if cursor is not None and (key <= cursor if not descending else key >= cursor):
            continue
        if after is not None and _started(sb) < after:
            continue
        if template is not None and template != _template_of(sb):
            continue
        view = services.sandboxes.view(sb)
        if view["status"] == Status.ERROR:
            continue  # E2B has no such state; kiln's own API shows it
        item = listed(sb, view)
        if item["state"] not in states:
            continue
        if len(page) == limit:  # one more exists: the next page starts after this one
            return [i for _, i in page], _encode_token(page[-1][0])
        page.append((sb, item))
    return [i for _, i in page], None


PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE)]


@router.get("/v2/sandboxes")
async def list_sandboxes(
    *,
    response: Response,
    user: E2bUser,
    services: AppServices,
    metadata: Annotated[str | None, Query(description="urlencoded key=value pairs")] = None,
    state: Annotated[str | None, Query(description="running, paused (comma-separated)")] = None,
    order: Annotated[str | None, Query(description="asc (default) or desc, by start")] = None,
    started_after: Annotated[str | None, Query(alias="startedAfter")] = None,
    template: str | None = None,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
    limit: PageLimit = MAX_PAGE,
) -> list[dict[str, Any]]:
    """The user's sandboxes (E2B ``ListedSandbox``), a page at a time: the next
    page's token is in the ``x-next-token`` header."""
    page, more = _page(
        services,
        user,
        metadata=metadata,
        state=state,
        order=order,
        started_after=started_after,
        template=template,
        next_token=next_token,
        limit=limit,
    )
    if more is not None:
        response.headers["x-next-token"] = more
    return page


@router.get("/sandboxes")
async def list_running_sandboxes(
    user: E2bUser,
    services: AppServices,
    metadata: Annotated[str | None, Query(description="urlencoded key=value pairs")] = None,
) -> list[dict[str, Any]]:
    """The user's running sandboxes (E2B's first list, without paging)."""
    page, _ = _page(
        services,
        user,
        metadata=metadata,
        state="running",
        order=None,
        started_after=None,
        template=None,
        next_token=None,
        limit=10**9,
    )
    return page


# ------------------------------------------------------------------------ one sandbox


def _find(services: Services, user: User, sandbox_id: str) -> SandboxRow:
    try:
        row: SandboxRow = services.sandboxes.find(user, sandbox_id)
    except (NotFound, NotFoundError):
        raise NotFoundError(f"sandbox {sandbox_id!r} not found") from None
    return row


@router.get("/sandboxes/{sandbox}")
async def get_sandbox(sandbox: str, user: E2bUser, services: AppServices) -> dict[str, Any]:
    """E2B ``SandboxDetail`` (never wakes the sandbox)."""
    sb = _find(services, user, sandbox)
    return detail(sb, services.sandboxes.view(sb), services.envd_tokens.issue(sb.id))


@router.delete("/sandboxes/{sandbox}", status_code=204)
async def kill_sandbox(sandbox: str, user: E2bUser, services: AppServices) -> Response:
    """Destroy it (404 once it is gone: the SDK's ``kill()`` is then False)."""
    sb = _find(services, user, sandbox)
    await services.sandboxes.delete(user, sb.id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox}/pause", status_code=204)
async def pause_sandbox(
    sandbox: str,
    user: E2bUser,
    services: AppServices,
    body: Annotated[PauseSandbox | None, Body()] = None,
) -> Response:
    """kiln's stop: on QEMU the memory and processes are kept and a connect restores
    them; a Docker sandbox keeps its files only. 409 when already paused. As on E2B,
    a paused sandbox has no timeout: it stays until a connect (which sets a new
    one) or a kill."""
    pause = body or PauseSandbox()
    if pause.memory is False:
        raise NotSupported(
            "memory false (a filesystem-only pause) is not supported by kiln:"
            " a pause keeps the memory where the engine can"
        )
    sb = _find(services, user, sandbox)
    if services.sandboxes.view(sb)["status"] == Status.STOPPED:
        raise ConflictError(f"sandbox {sandbox!r} is already paused")
    await services.sandboxes.stop(user, sb.id)
    services.sandboxes.patch(user, sb.id, PatchSandbox.model_validate({"ttl_s": None}))
    return Response(status_code=204)


async def _resume(
    services: Services, user: User, sandbox: str, body: ConnectSandbox, *, legacy: bool
) -> tuple[SandboxRow, bool]:
    """Start the sandbox if it is paused; set its expiry. (row, whether it was resumed)."""
    if body.memory is False:
        raise NotSupported(
            "memory false (resume by a cold boot from disk) is not supported by kiln:"
            " a resume restores the sandbox as it was paused"
        )
    sb = _find(services, user, sandbox)
    timeout = float(body.timeout if body.timeout is not None else DEFAULT_TIMEOUT_S)
    status = services.sandboxes.view(sb)["status"]
    if status == Status.STOPPED:
        await services.sandboxes.start(user, sb.id)
        patch: dict[str, Any] = {"ttl_s": timeout}
        if body.auto_pause is not None:
            patch["on_expire"] = "stop" if body.auto_pause else "destroy"
        services.sandboxes.patch(user, sb.id, PatchSandbox.model_validate(patch))
        return services.sandboxes.find(user, sb.id), True
    if legacy:
        raise ConflictError(f"sandbox {sandbox!r} is already running")
    if status == Status.ERROR:
        raise ConflictError(f"sandbox {sandbox!r} is in error; it can only be killed")
    # A running sandbox's expiry only ever moves later on connect (E2B's rule).
    end = services.clock() + timeout
    if sb.expires_at is not None and sb.expires_at < end:
        services.sandboxes.patch(user, sb.id, PatchSandbox.model_validate({"ttl_s": timeout}))
    return services.sandboxes.find(user, sb.id), False


@router.post("/v2/sandboxes/{sandbox}/connect")
@router.post("/sandboxes/{sandbox}/connect", include_in_schema=False)
async def connect_sandbox(
    sandbox: str,
    user: E2bUser,
    services: AppServices,
    body: Annotated[ConnectSandbox | None, Body()] = None,
) -> JSONResponse:
    """Resume a paused sandbox (201) or keep a running one (200) → E2B ``Sandbox``."""
    sb, resumed = await _resume(services, user, sandbox, body or ConnectSandbox(), legacy=False)
    content = created(sb, services.envd_tokens.issue(sb.id))
    return JSONResponse(content, status_code=201 if resumed else 200)


@router.post("/sandboxes/{sandbox}/resume", status_code=201)
async def resume_sandbox(
    sandbox: str,
    user: E2bUser,
    services: AppServices,
    body: Annotated[ConnectSandbox | None, Body()] = None,
) -> dict[str, Any]:
    """Older SDKs' resume: 409 when it is not paused."""
    sb, _ = await _resume(services, user, sandbox, body or ConnectSandbox(), legacy=True)
    return created(sb, services.envd_tokens.issue(sb.id))


@router.post("/sandboxes/{sandbox}/timeout", status_code=204)
async def set_timeout(
    sandbox: str, req: SetTimeout, user: E2bUser, services: AppServices
) -> Response:
    """The sandbox now expires ``timeout`` seconds from now (killed, or paused with
    autoPause), sooner or later than before."""
    sb = _find(services, user, sandbox)
    # 0 is "now": kiln's own ttl_s is positive, so the smallest one stands for it.
    services.sandboxes.patch(
        user, sb.id, PatchSandbox.model_validate({"ttl_s": float(max(req.timeout, 1e-3))})
    )
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox}/metrics")
async def sandbox_metrics(
    sandbox: str,
    user: E2bUser,
    services: AppServices,
    start: Annotated[int | None, Query(ge=0)] = None,
    end: Annotated[int | None, Query(ge=0)] = None,
) -> list[dict[str, Any]]:
    """No samples: kiln records no metrics history (the SDK's ``get_metrics()`` → [])."""
    _find(services, user, sandbox)
    return []


_UNSUPPORTED = {
    ("POST", "/sandboxes/{sandbox}/fork"): "fork",
    ("POST", "/sandboxes/{sandbox}/snapshots"): "snapshots",
    ("PUT", "/sandboxes/{sandbox}/network"): "network updates",
    ("POST", "/sandboxes/{sandbox}/refreshes"): "refreshes",
    ("GET", "/sandboxes/{sandbox}/logs"): "sandbox logs",
    ("GET", "/v2/sandboxes/{sandbox}/logs"): "sandbox logs",
}
#: E2B's other APIs, whole: kiln's templates, volumes and secrets have their own API.
_UNSUPPORTED_TREES = {
    "/templates": "template builds and E2B templates",
    "/v2/templates": "template builds and E2B templates",
    "/v3/templates": "template builds and E2B templates",
    "/default-templates": "E2B templates",
    "/volumes": "E2B volumes (kiln volumes are mounted by name with volumeMounts)",
    "/secrets": "E2B secrets",
    "/snapshots": "snapshots",
}
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _unsupported(what: str) -> Any:
    async def endpoint(user: E2bUser) -> Response:
        raise NotSupported(f"{what}: not supported by kiln's E2B API")

    return endpoint


for (_method, _path), _what in _UNSUPPORTED.items():
    router.add_api_route(_path, _unsupported(_what), methods=[_method], include_in_schema=False)
for _path, _what in _UNSUPPORTED_TREES.items():
    for _route in (_path, _path + "/{rest:path}"):
        router.add_api_route(
            _route, _unsupported(_what), methods=_ALL_METHODS, include_in_schema=False
        )
