"""Errors of the HTTP layer, and the one place other packages' errors become statuses.

    ApiError                     root: carries an HTTP status and a message
    ├── BadRequest               400 malformed input (bad JSON, a bad query value)
    ├── Unauthorized             401 missing or wrong API key
    ├── Forbidden                403 over quota
    ├── NotFoundError            404 unknown sandbox/template/secret/volume/session/file
    ├── ConflictError            409 name taken, volume in use, wrong sandbox state,
    │                                process finished, resize without a terminal
    ├── LengthRequired           411 upload without Content-Length
    ├── PayloadTooLarge          413 body over the limit
    ├── Unprocessable            422 fields that parse but are invalid
    ├── BadGateway               502 the sandbox's agent misbehaved or is unreachable
    └── Unavailable              503 no engine can run here, the store's database is down

Everything a route can meet (store, engine, agent client errors) is mapped to
an :class:`ApiError` by :func:`to_api_error`; the app turns each into
``{"error": message}`` with its status. Anything else is a bug: it becomes a
500 with a generic message, and the traceback goes to the daemon's log only.
"""

from __future__ import annotations

from kiln import agent_client as ac
from kiln import store
from kiln.engine import errors as eng
from kiln.images import BuildFailed, ImageError, InvalidDefinition, UnknownTier
from kiln.network.errors import NetworkError
from kiln.protocol import ProtocolError


class ApiError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFoundError(ApiError):
    status = 404


class ConflictError(ApiError):
    status = 409


class LengthRequired(ApiError):
    status = 411


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    status = 422


class BadGateway(ApiError):
    status = 502


class Unavailable(ApiError):
    status = 503


class Timeout(ApiError):
    status = 504


def to_api_error(exc: BaseException) -> ApiError | None:
    """The API error for an exception raised below the HTTP layer; None if unknown."""
    if isinstance(exc, ApiError):
        return exc
    msg = str(exc) or type(exc).__name__
    match exc:
        # store
        case store.NotFound():
            return NotFoundError(msg)
        case store.Conflict():
            return ConflictError(msg)
        case store.QuotaExceeded():
            return Forbidden(msg)
        case store.InvalidValue():
            return Unprocessable(msg)
        case store.StoreUnavailable():
            return Unavailable(f"store unavailable: {msg}")
        case store.StoreError():
            return ApiError(f"store: {msg}")
        # engine
        case eng.SandboxNotFound():
            return NotFoundError(msg)
        case eng.InvalidSpec():
            return Unprocessable(msg)
        case eng.ImageNotFound():
            return Unprocessable(msg)
        case eng.InvalidState():
            return ConflictError(msg)
        case eng.EngineUnavailable():
            return Unavailable(f"engine unavailable: {msg}")
        case eng.SandboxCrashed():
            return ConflictError(f"sandbox crashed: {msg}")
        case eng.EngineError():
            return ApiError(f"engine error: {msg}")
        # agent
        case ac.RemoteNotFound():
            return NotFoundError(msg)
        case ac.RemoteExists():
            return ConflictError(msg)
        case ac.RemotePermissionDenied():
            return Forbidden(msg)
        case ac.ProcessFinished() | ac.NoTerminal():
            return ConflictError(msg)
        case ac.ForwardError():
            return BadGateway(msg)
        case ac.RemoteError():
            return BadRequest(msg)
        case ac.AgentTimeout():
            return Timeout(msg)
        case ac.AgentError():
            return BadGateway(f"sandbox agent: {msg}")
        # images
        case UnknownTier() | InvalidDefinition():
            return Unprocessable(msg)
        case BuildFailed():
            return Unprocessable(f"image build failed: {msg}")
        case ImageError():
            return Unavailable(f"image build failed: {msg}")
        case NetworkError():
            return Unavailable(f"network: {msg}")
        case ProtocolError():
            return BadRequest(msg)
    return None
