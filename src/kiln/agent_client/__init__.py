"""Host-side client of the guest agent (asyncio).

    client = AgentClient(Endpoint.tcp("10.0.0.2"), token)
    result = await client.exec(["uname", "-a"])

See :mod:`.client` for the operations, :mod:`.transport` for endpoints and
dialers, and :mod:`.errors` for the exception tree.
"""

from .client import DEFAULT_SHELL, AgentClient
from .errors import (
    AgentConnectError,
    AgentConnectionLost,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AuthError,
    CannotStart,
    ForwardError,
    NoTerminal,
    ProcessFinished,
    ProcessNotFound,
    RemoteError,
    RemoteExists,
    RemoteNotADirectory,
    RemoteNotFound,
    RemotePermissionDenied,
)
from .exec import ExecEvent, ExecProcess, ExecResult, Exit, Stderr, Stdout
from .files import FileContent, FileReader, WriteSource
from .forward import ForwardStream
from .processes import ProcessOutput
from .transport import (
    CONTROL_PORT,
    FORWARD_PORT,
    Dialer,
    Endpoint,
    SocketFactory,
    tcp_dialer,
    unix_dialer,
)
from .tty import TtySession
from .watch import DirWatch

__all__ = [
    "CONTROL_PORT",
    "DEFAULT_SHELL",
    "FORWARD_PORT",
    "AgentClient",
    "AgentConnectError",
    "AgentConnectionLost",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "AuthError",
    "CannotStart",
    "Dialer",
    "DirWatch",
    "Endpoint",
    "ExecEvent",
    "ExecProcess",
    "ExecResult",
    "Exit",
    "FileContent",
    "FileReader",
    "ForwardError",
    "ForwardStream",
    "NoTerminal",
    "ProcessFinished",
    "ProcessNotFound",
    "ProcessOutput",
    "RemoteError",
    "RemoteExists",
    "RemoteNotADirectory",
    "RemoteNotFound",
    "RemotePermissionDenied",
    "SocketFactory",
    "Stderr",
    "Stdout",
    "TtySession",
    "WriteSource",
    "tcp_dialer",
    "unix_dialer",
]
