"""Who a command may run as: ``root`` or the image's sandbox user (the default).

One small check shared by the routes that start commands, so the rule lives in
one place.
"""

from __future__ import annotations

from .errors import Unprocessable

#: The guest's own default when the engine names no user (kiln.guest.config).
DEFAULT_SANDBOX_USER = "sandbox"


def sandbox_user(engine: object) -> str:
    """The name of the sandbox user of ``engine``'s guests."""
    config = getattr(engine, "config", None)
    name = getattr(config, "guest_user", None)
    return name if isinstance(name, str) and name else DEFAULT_SANDBOX_USER


def check_user(user: str | None, sandbox: str) -> str | None:
    """The ``user`` to send to the agent: ``"root"``, or None for the sandbox user.

    The sandbox user is sent as None (the agent's default) because a test-mode
    agent's sandbox user is whoever runs it, not an account of that name.
    Anything else is a 422: a typo must not silently run as someone else.
    """
    if user is None or user == sandbox:
        return None
    if user == "root":
        return user
    raise Unprocessable(f"user: must be 'root' or the sandbox user {sandbox!r}, got {user!r}")
