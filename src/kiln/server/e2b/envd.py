"""``/e2b/envd``: E2B's in-sandbox service, for every sandbox, routed by header.

The SDK (with ``E2B_SANDBOX_URL`` set) sends every envd call here, naming the
sandbox in ``E2b-Sandbox-Id`` (kiln's id, or its name) and proving it may use
it with ``X-Access-Token`` (:class:`~.tokens.EnvdTokens`). Each call resolves
the sandbox, checks the token, makes the sandbox hot (as kiln's own routes do)
and hands the handler an :class:`EnvdCall`.

Two kinds of endpoint:

- Connect RPC services (``POST /e2b/envd/<package.Service>/<Method>``):
  :data:`SERVICES` lists them; each is a :class:`~.connect.Service` whose
  handlers take ``(call: EnvdCall, request)``. Errors are Connect codes.
- plain HTTP (``GET /e2b/envd/health``, ``/files``): FastAPI routes on
  :data:`router`; :func:`envd_call` is the dependency that resolves the
  sandbox, and :class:`EnvdHttpError` answers envd's ``{"code","message"}``.

A sandbox that does not exist (or no longer does) answers as E2B's edge does:
``unavailable`` (502 for plain HTTP) with "... was not found", which the SDK
turns into ``SandboxNotRunningException``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from connectrpc.request import RequestContext
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from kiln.agent_client import AgentClient
from kiln.protocol import ROOT_USER
from kiln.store import NotFound
from kiln.store import Sandbox as SandboxRow

from ..auth import services_of
from ..services import Services
from .connect import Code, ConnectApp, ConnectError, Service, connect_error
from .tokens import EnvdTokens
from .users import E2B_USER, default_user

__all__ = [
    "SANDBOX_HEADER",
    "TOKEN_HEADER",
    "EnvdCall",
    "EnvdHttpError",
    "envd_app",
    "envd_call",
    "router",
]

PREFIX = "/e2b/envd"
SANDBOX_HEADER = "e2b-sandbox-id"
TOKEN_HEADER = "x-access-token"


@dataclass(frozen=True, slots=True)
class EnvdCall:
    """One envd call: the sandbox (hot), its agent, and who the SDK runs as."""

    services: Services
    sandbox: SandboxRow
    agent: AgentClient
    #: The agent's user: None for the sandbox's unprivileged user, or "root".
    user: str | None
    headers: Mapping[str, str]
    #: Seconds left of the call's deadline (``connect-timeout-ms``), when it has one.
    deadline_s: float | None = None

    @property
    def account(self) -> str:
        """The account the call runs as."""
        return self.user or default_user(self.sandbox)

    def touch(self) -> None:
        """Record activity, so the sandbox is not paused under a running call."""
        self.services.sandboxes.touch(self.sandbox.id)


class EnvdHttpError(Exception):
    """An error of a plain envd endpoint, answered as ``{"code", "message"}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def tokens_of(services: Services) -> EnvdTokens:
    return services.envd_tokens


def _not_found(ref: str) -> ConnectError:
    return ConnectError(Code.UNAVAILABLE, f"The sandbox {ref} was not found")


def find_sandbox(services: Services, headers: Mapping[str, str]) -> SandboxRow:
    """The live sandbox the headers name and may use (Connect errors otherwise)."""
    ref = headers.get(SANDBOX_HEADER, "").strip()
    if not ref:
        raise ConnectError(Code.INVALID_ARGUMENT, "the E2b-Sandbox-Id header is required")
    token = headers.get(TOKEN_HEADER)
    tokens = tokens_of(services)
    store = services.store
    try:
        sb = store.get_sandbox(ref)
    except NotFound:
        # Names are per user and the token is the only credential here: the
        # sandbox of that name whose token this is.
        named = [s for s in store.list_live_sandboxes() if s.name == ref]
        if not named:
            raise _not_found(ref) from None
        for candidate in named:
            if tokens.verify(candidate.id, token):
                return candidate
        raise ConnectError(Code.UNAUTHENTICATED, "invalid or missing X-Access-Token") from None
    if not tokens.verify(sb.id, token):
        raise ConnectError(Code.UNAUTHENTICATED, "invalid or missing X-Access-Token")
    return sb


def user_of(headers: Mapping[str, str]) -> str | None:
    """The account named by ``Authorization: Basic base64("<user>:")``, if any."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        raise ConnectError(Code.UNAUTHENTICATED, "the Authorization header must be Basic")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, ValueError):
        raise ConnectError(Code.UNAUTHENTICATED, "malformed Basic credentials") from None
    return decoded.partition(":")[0] or None


def agent_user(sb: SandboxRow, name: str | None) -> str | None:
    """The agent's user for account ``name``: None for the sandbox's own account
    (also when asked for by E2B's name for it, ``user``), or root."""
    if name == ROOT_USER:
        return ROOT_USER
    if name is None or name in (default_user(sb), E2B_USER):
        return None
    raise ConnectError(
        Code.INVALID_ARGUMENT,
        f"unknown user {name!r}: commands run as {default_user(sb)!r} or 'root'",
    )


async def resolve(
    services: Services, headers: Mapping[str, str], deadline_s: float | None = None
) -> EnvdCall:
    name = user_of(headers)
    sb = find_sandbox(services, headers)
    user = agent_user(sb, name)
    try:
        sb, client = await services.sandboxes.wake(sb)
    except NotFound:
        raise _not_found(sb.id) from None
    return EnvdCall(services, sb, client, user, headers, deadline_s)


# ---------------------------------------------------------------- Connect services


def envd_app(services: Services, rpc_services: list[Service[EnvdCall]]) -> ConnectApp[EnvdCall]:
    """The ASGI app of the envd Connect services (mounted at :data:`PREFIX`)."""

    async def bind(ctx: RequestContext[Any, Any]) -> EnvdCall:
        ms = ctx.timeout_ms
        return await resolve(services, ctx.request_headers, None if ms is None else ms / 1000)

    return ConnectApp(rpc_services, bind)


# ---------------------------------------------------------------- plain HTTP

router = APIRouter(prefix=PREFIX, tags=["e2b"], include_in_schema=False)


async def envd_call(request: Request) -> EnvdCall:
    """The dependency of plain envd routes: the resolved, hot sandbox."""
    try:
        return await resolve(services_of(request), request.headers)
    except ConnectError as exc:
        raise EnvdHttpError(_http_status(exc.code), exc.message) from None


EnvdCallDep = Annotated[EnvdCall, Depends(envd_call)]

_HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.FAILED_PRECONDITION: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 502,
    Code.DEADLINE_EXCEEDED: 504,
}


def _http_status(code: Code) -> int:
    return _HTTP_STATUS.get(code, 500)


def http_error(exc: BaseException) -> EnvdHttpError | None:
    """The envd HTTP error for what a plain route met (None: a bug)."""
    if isinstance(exc, EnvdHttpError):
        return exc
    err = connect_error(exc)
    return None if err is None else EnvdHttpError(_http_status(err.code), err.message)


def envd_error_response(exc: EnvdHttpError) -> JSONResponse:
    return JSONResponse({"code": exc.status, "message": exc.message}, status_code=exc.status)


@router.get("/health")
async def health(request: Request) -> Response:
    """204 while the sandbox exists; 502 "... was not found" once it is gone.
    Like envd's, it needs no token; unlike a command it never wakes the sandbox."""
    services = services_of(request)
    ref = request.headers.get(SANDBOX_HEADER, "").strip()
    try:
        sb = services.store.get_sandbox(ref)
    except NotFound:
        named = [s for s in services.store.list_live_sandboxes() if s.name == ref]
        if not named:
            raise EnvdHttpError(502, f"The sandbox {ref} was not found") from None
        sb = named[0]
    if sb.status != "running":
        raise EnvdHttpError(502, f"The sandbox {sb.id} was not found (it is {sb.status})")
    return Response(status_code=204)
