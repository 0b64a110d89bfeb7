"""Errors raised by the kiln SDK. Every call raises only these.

    KilnError                    root: ``except KilnError`` catches everything below
    ├── ConnectionError          the daemon could not be reached or the transport failed
    │   └── Timeout              connect, read or write timed out
    ├── InvalidResponse          the daemon answered something that breaks the API contract
    ├── ConfigError              ~/.kiln/config.yaml (or a URL given) is unusable
    └── APIError                 the daemon answered with an error status (``.status_code``)
        ├── ValidationError      400 bad input, 411 length required, 413 too large, 422 invalid
        ├── AuthenticationError  401 missing or wrong API key
        ├── PermissionDenied     403 over quota or not yours
        ├── NotFound             404 unknown sandbox, volume, secret, template, file, ...
        ├── Conflict             409 name taken, volume in use
        └── ServerError          5xx
            └── Unavailable      503 engine unavailable

The message of an :class:`APIError` is the daemon's own ``{"error": "..."}`` text.
Foreign exceptions (httpx, websockets) are translated once, where the SDK calls
those libraries, and chained with ``from`` so the original stays inspectable.
"""

from __future__ import annotations


class KilnError(Exception):
    """Root of every error the kiln SDK raises."""


class ConnectionError(KilnError):
    """The daemon could not be reached, or the connection failed mid-request."""


class Timeout(ConnectionError):
    """Connecting to, writing to or reading from the daemon timed out."""


class InvalidResponse(KilnError):
    """The daemon's answer does not match the API contract (wrong JSON shape, bad header)."""


class ConfigError(KilnError):
    """The client configuration (``~/.kiln/config.yaml``, a URL) is unreadable or invalid."""


class APIError(KilnError):
    """The daemon answered with an error status.

    ``status_code`` is the HTTP status, ``message`` the daemon's error text.
    """

    status_code: int

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class ValidationError(APIError):
    """400, 411, 413 or 422: the request was rejected as malformed, too large or invalid."""


class AuthenticationError(APIError):
    """401: the API key is missing or wrong."""


class PermissionDenied(APIError):
    """403: over quota, or the resource belongs to another user."""


class NotFound(APIError):
    """404: no such sandbox, volume, secret, template, session or file."""


class Conflict(APIError):
    """409: the name is taken or the resource is in use."""


class ServerError(APIError):
    """5xx: the daemon failed."""


class Unavailable(ServerError):
    """503: the sandbox engine is unavailable."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    411: ValidationError,
    413: ValidationError,
    422: ValidationError,
    503: Unavailable,
}


def error_for_status(status_code: int, message: str) -> APIError:
    """The exception for an error ``status_code`` (>= 400) carrying ``message``."""
    cls = _BY_STATUS.get(status_code)
    if cls is None:
        cls = ServerError if status_code >= 500 else APIError
    return cls(message, status_code)
