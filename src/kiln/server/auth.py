"""Bearer-token authentication (WebSockets may pass the key as ``?token=``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

from kiln.store import User

from .errors import Unauthorized
from .services import Services


def bearer_token(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(services: Services, token: str | None) -> User:
    if not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    user = services.store.user_by_key(token)
    if user is None:
        raise Unauthorized("invalid API key")
    return user


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


#: Declares the scheme in the OpenAPI document (and so in /docs' "Authorize");
#: the header itself is parsed by :func:`bearer_token`, with kiln's own 401s.
API_KEY = HTTPBearer(
    scheme_name="apiKey",
    description="A kiln API key: `Authorization: Bearer kiln_...`",
    auto_error=False,
)


async def current_user(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(API_KEY)] = None,
) -> User:
    """FastAPI dependency: the user owning the request's bearer token (401 otherwise)."""
    return authenticate(services_of(request), bearer_token(request.headers))
