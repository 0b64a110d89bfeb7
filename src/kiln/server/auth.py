"""Bearer-token authentication (WebSockets may pass the key as ``?token=``)."""

from __future__ import annotations

from fastapi import Request
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


async def current_user(request: Request) -> User:
    """FastAPI dependency: the user owning the request's bearer token (401 otherwise)."""
    return authenticate(services_of(request), bearer_token(request.headers))
