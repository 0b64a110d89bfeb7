"""Dependencies shared by the route modules (async: FastAPI runs sync ones in threads)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kiln.store import User

from ..auth import current_user, services_of
from ..publishing import Origin
from ..services import Services


async def _services(request: Request) -> Services:
    return services_of(request)


CurrentUser = Annotated[User, Depends(current_user)]
AppServices = Annotated[Services, Depends(_services)]


def origin_of(request: Request) -> Origin:
    """How the client reached the daemon (for the URLs the answer carries)."""
    return Origin.of(request.url.scheme, request.headers)
