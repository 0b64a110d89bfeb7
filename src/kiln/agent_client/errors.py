"""Errors raised by the agent client.

    AgentError                    root of everything this package raises
    ├── AgentConnectError         could not reach the agent (refused, no socket, connect timeout)
    ├── AgentConnectionLost       the connection broke in the middle of an operation
    ├── AgentTimeout              an operation (or the agent's first answer) took too long
    ├── AuthError                 the agent refused our token
    ├── RemoteError               the agent answered ERROR; ``.message`` is its text
    │   ├── RemoteNotFound        ... about a path or session that does not exist
    │   │   └── ProcessNotFound   no process with that pid in the agent's table
    │   ├── RemoteExists          the path to create (mkdir, move) exists already
    │   ├── RemotePermissionDenied  the acting user may not do that to the path
    │   ├── RemoteNotADirectory   a directory was expected (ls, watch, a path's parent)
    │   ├── ProcessFinished       the process has exited (no more stdin or signals)
    │   ├── NoTerminal            a resize for a process that has no terminal
    │   ├── CannotStart           a background command could not be started
    │   └── ForwardError          FWD_RESP said error (nothing listens on the port, ...)
    └── AgentProtocolError        the agent broke the wire protocol (bad frame, unexpected
                                  frame, closed before answering); chained ``from`` the
                                  :class:`kiln.protocol.ProtocolError` when there is one

OSError and :class:`kiln.protocol.ProtocolError` are translated once, in
:mod:`kiln.agent_client.transport`. ``asyncio.CancelledError`` is never
caught or wrapped. Misuse of the client itself (a bad argument) raises
``ValueError``/``TypeError`` as usual, not an AgentError.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error raised by :mod:`kiln.agent_client`."""


class AgentConnectError(AgentError):
    """The agent could not be reached (nothing listening, refused, timed out)."""


class AgentConnectionLost(AgentError):
    """The connection failed after it was established."""


class AgentTimeout(AgentError):
    """An operation did not finish within its timeout."""


class AuthError(AgentError):
    """The agent rejected the token (or wanted one and got none)."""


class RemoteError(AgentError):
    """The agent reported an error for the request (an ERROR frame)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RemoteNotFound(RemoteError):
    """The path or session named in the request does not exist in the sandbox."""


class RemoteExists(RemoteError):
    """The path a request would create exists already."""


class RemotePermissionDenied(RemoteError):
    """The acting user lacks the permission (EACCES, EPERM)."""


class RemoteNotADirectory(RemoteError):
    """A path that must be a directory is not one."""


class ProcessNotFound(RemoteNotFound):
    """No process with that pid is in the agent's process table."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class ProcessFinished(RemoteError):
    """The process has exited: it takes no more input or signals."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class NoTerminal(RemoteError):
    """A terminal resize for a process started without one."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class CannotStart(RemoteError):
    """A background command could not be started (not found, not executable, bad cwd).

    ``exit_code`` is what an exec of it would have exited with (127 or 126)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ForwardError(RemoteError):
    """The agent could not open the forwarded port."""


class AgentProtocolError(AgentError):
    """The agent sent something the protocol does not allow."""
