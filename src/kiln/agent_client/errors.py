"""Errors raised by the agent client.

    AgentError                    root of everything this package raises
    ├── AgentConnectError         could not reach the agent (refused, no socket, connect timeout)
    ├── AgentConnectionLost       the connection broke in the middle of an operation
    ├── AgentTimeout              an operation (or the agent's first answer) took too long
    ├── AuthError                 the agent refused our token
    ├── RemoteError               the agent answered ERROR; ``.message`` is its text
    │   ├── RemoteNotFound        ... about a path or session that does not exist
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


class ForwardError(RemoteError):
    """The agent could not open the forwarded port."""


class AgentProtocolError(AgentError):
    """The agent sent something the protocol does not allow."""
