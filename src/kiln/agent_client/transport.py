"""How the client reaches an agent, and the one place foreign errors are translated.

An :class:`Endpoint` is two *dialers* (control and forward connection), each an
``async () -> socket`` callable returning a connected stream socket. The stock
ones dial TCP (a VM over its TAP network) or Unix sockets (the agent's test
mode); an engine can pass its own, for example one whose socket is created
inside a network namespace.

:class:`Connection` drives the sans-IO codec (:class:`~kiln.protocol.FrameDecoder`,
:func:`~kiln.protocol.encode_frame`) over that socket with the event loop's
``sock_*`` calls, and converts ``OSError`` and
:class:`~kiln.protocol.ProtocolError` into :mod:`kiln.agent_client.errors`
exactly once, here.

Why not ``asyncio.StreamReader``/``StreamWriter``: the agent closes a
connection as soon as its operation ends, possibly before it has read
everything the host sent (a command that exits without reading its stdin).
The host's next write then fails with EPIPE, and an asyncio stream transport
reacts to a failed write by closing the socket and failing every later
``read()``, losing the EXIT frame that had already arrived. Here a failed
send only marks the connection as unable to send; what the agent said is still
read to the end. (Forwarded connections, raw byte relays, are handed over as a
real StreamReader/StreamWriter pair once the FWD_RESP is in.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from kiln.protocol import (
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    encode_frame,
    is_known_type,
)

from .errors import (
    AgentConnectError,
    AgentConnectionLost,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AuthError,
    RemoteError,
    RemoteExists,
    RemoteNotADirectory,
    RemoteNotFound,
    RemotePermissionDenied,
)

#: The agent's TCP ports inside a sandbox.
CONTROL_PORT: Final = 1024
FORWARD_PORT: Final = 1025
#: Bytes asked of the kernel per receive (into one reused buffer), once a
#: connection has shown it carries bulk data; small answers use a small buffer.
READ_SIZE: Final = 256 * 1024
_FIRST_READ_SIZE: Final = 16 * 1024

#: Opens one new connection to the agent: a connected, non-blocking stream
#: socket. Raises OSError when it cannot.
Dialer = Callable[[], Awaitable[socket.socket]]
#: Makes an unconnected socket for an address family (e.g. inside a network namespace).
SocketFactory = Callable[[int], socket.socket]


async def _connect(sock: socket.socket, address: str | tuple[Any, ...]) -> socket.socket:
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_dialer(host: str, port: int, socket_factory: SocketFactory | None = None) -> Dialer:
    """Dial ``host:port`` over TCP, on a socket made by ``socket_factory`` if given."""

    async def dial() -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, address in infos:
            if socket_factory is not None:
                sock = socket_factory(family)
            else:
                sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                return await _connect(sock, address)
            except OSError as exc:
                error = exc
        raise error

    return dial


def unix_dialer(path: str | os.PathLike[str]) -> Dialer:
    """Dial a Unix stream socket (the agent's test mode)."""
    target = os.fspath(path)

    async def dial() -> socket.socket:
        return await _connect(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), target)

    return dial


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an agent listens: one dialer per connection kind."""

    control: Dialer
    forward: Dialer
    description: str = "agent"

    @classmethod
    def tcp(
        cls,
        host: str,
        control_port: int = CONTROL_PORT,
        forward_port: int = FORWARD_PORT,
        *,
        socket_factory: SocketFactory | None = None,
    ) -> Endpoint:
        return cls(
            tcp_dialer(host, control_port, socket_factory),
            tcp_dialer(host, forward_port, socket_factory),
            f"agent at {host}:{control_port}",
        )

    @classmethod
    def unix(cls, control: str | os.PathLike[str], forward: str | os.PathLike[str]) -> Endpoint:
        return cls(unix_dialer(control), unix_dialer(forward), f"agent at {os.fspath(control)}")

    @classmethod
    def unix_dir(cls, socket_dir: str | os.PathLike[str]) -> Endpoint:
        """The test-mode layout: ``control.sock`` and ``forward.sock`` in one directory."""
        base = Path(socket_dir)
        return cls.unix(base / "control.sock", base / "forward.sock")


# An agent's ERROR text is free-form; these decide which exception it becomes.
_AUTH_RE: Final = re.compile(r"auth|token|unauthori[sz]ed", re.I)
_NOT_FOUND_RE: Final = re.compile(
    r"no such (file|session|directory)|not found|does not exist|unknown session|no session",
    re.I,
)
_EXISTS_RE: Final = re.compile(r"file exists", re.I)
_PERMISSION_RE: Final = re.compile(r"permission denied|operation not permitted", re.I)
_NOT_A_DIRECTORY_RE: Final = re.compile(r"not a directory", re.I)


def remote_error(message: str, *, first_answer: bool) -> AgentError:
    """The exception for an ERROR frame. ``first_answer``: nothing came before it."""
    if first_answer and _AUTH_RE.search(message):
        return AuthError(message)
    if _NOT_FOUND_RE.search(message):
        return RemoteNotFound(message)
    if _EXISTS_RE.search(message):
        return RemoteExists(message)
    if _PERMISSION_RE.search(message):
        return RemotePermissionDenied(message)
    if _NOT_A_DIRECTORY_RE.search(message):
        return RemoteNotADirectory(message)
    return RemoteError(message)


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn I/O and protocol exceptions into AgentErrors (CancelledError passes)."""
    try:
        yield
    except ProtocolError as exc:
        raise AgentProtocolError(f"{what}: {exc}") from exc
    except OSError as exc:  # ConnectionError, BrokenPipeError, ETIMEDOUT, ...
        raise AgentConnectionLost(f"{what}: {exc or type(exc).__name__}") from exc


async def dial(dialer: Dialer, within: float | None, description: str) -> socket.socket:
    """Open one connection within ``within`` seconds or raise AgentConnectError."""
    try:
        async with asyncio.timeout(within):
            return await dialer()
    except TimeoutError as exc:  # ours, or the kernel's ETIMEDOUT
        raise AgentConnectError(f"timed out connecting to {description}") from exc
    except OSError as exc:
        raise AgentConnectError(f"cannot connect to {description}: {exc}") from exc


class Connection:
    """One framed connection to the agent, used for exactly one operation.

    The AUTH frame (when there is a token) is not sent on its own: it goes out
    in the same write as the request. Every frame is sent whole under a lock,
    so concurrent senders (stdin feeder, kill) never interleave bytes. Frames
    of types this client does not know are skipped, as the protocol asks.
    Only one task may receive at a time.
    """

    __slots__ = (
        "_answered",
        "_buffer",
        "_closed",
        "_decoder",
        "_loop",
        "_prefix",
        "_receiving",
        "_send_failed",
        "_send_lock",
        "_sock",
    )

    def __init__(self, sock: socket.socket, token: str | None) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder()
        self._buffer = bytearray(_FIRST_READ_SIZE)
        self._prefix = b"" if token is None else encode_frame(FrameType.AUTH, token.encode())
        self._send_lock = asyncio.Lock()
        self._answered = False
        self._closed = False
        self._receiving = False
        self._send_failed = False

    # -- sending ------------------------------------------------------------------------

    async def send(self, ftype: int, payload: bytes | bytearray | memoryview = b"") -> bool:
        """Send one frame. False (and nothing raised) when the connection cannot send.

        The agent closes a connection as soon as its operation ends, so a send
        can find it gone (input for a command that already exited, a request
        refused early). That is no error by itself: the read side tells what
        happened (the EXIT already received, an ERROR, or a lost connection).
        """
        return await self.send_frames(((ftype, payload),))

    async def send_frames(
        self, frames: Iterable[tuple[int, bytes | bytearray | memoryview]]
    ) -> bool:
        """Send several frames in one write (e.g. request + stdin + end of stdin)."""
        data = b"".join(encode_frame(ftype, payload) for ftype, payload in frames)
        if self._prefix:
            data = self._prefix + data
            self._prefix = b""
        if self._send_failed or self._closed:
            return False
        async with self._send_lock:
            try:
                await self._loop.sock_sendall(self._sock, data)
            except OSError:
                self._send_failed = True
                return False
            except asyncio.CancelledError:
                # Part of a frame may be out: nothing more can follow it. The agent
                # reads EOF (ending the operation); its answer can still be read.
                self._send_failed = True
                self.shutdown_write()
                raise
            finally:
                self._release_if_idle(sending=False)
        return True

    def shutdown_write(self) -> None:
        """Half-close: the agent reads EOF, its answer can still be received."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    # -- receiving ----------------------------------------------------------------------

    async def recv(self) -> Frame | None:
        """The next frame of a known type; None at a clean end of stream."""
        decoder = self._decoder
        with translate_errors("receiving from the agent"):
            while True:
                frame = decoder.next_frame()
                if frame is None:
                    data = await self._receive()
                    if not data:
                        if not self._closed:  # we may have cut a frame short ourselves
                            decoder.check_eof()
                        return None
                    decoder.feed(data)
                elif is_known_type(frame.type):
                    return frame

    async def _receive(self) -> memoryview:
        if self._closed:
            return memoryview(b"")
        buffer = self._buffer
        self._receiving = True
        try:
            n = await self._loop.sock_recv_into(self._sock, buffer)
        finally:
            self._receiving = False
            self._release_if_idle(sending=self._send_lock.locked())
        data = memoryview(buffer)[:n]
        if n == len(buffer) and n < READ_SIZE:
            self._buffer = bytearray(READ_SIZE)  # a bulk transfer: read more per call
        return data

    async def recv_answer(self, what: str) -> Frame:
        """The next frame, which must exist; an ERROR frame is raised as an AgentError."""
        frame = await self.recv()
        if frame is None:
            raise AgentConnectionLost(f"the agent closed the connection before {what}")
        self.check_error(frame)
        return frame

    async def first_answer(self, what: str, within: float | None) -> Frame:
        """:meth:`recv_answer` for the answer the agent sends at once, within
        ``within`` seconds (a wrong token shows here too); AgentTimeout otherwise."""
        try:
            async with asyncio.timeout(within):
                return await self.recv_answer(what)
        except TimeoutError:
            raise AgentTimeout(f"no {what} from the agent within {within} s") from None

    def check_error(self, frame: Frame) -> None:
        """Raise for an ERROR frame; otherwise note that the agent has answered."""
        first = not self._answered
        self._answered = True
        if frame.type == FrameType.ERROR:
            message = frame.payload.decode("utf-8", "replace")
            raise remote_error(message, first_answer=first)

    # -- handing over and closing ---------------------------------------------------------

    def detach(self) -> tuple[socket.socket, bytes]:
        """Give up the socket and the bytes received past the last frame (raw relay)."""
        if self._closed or self._receiving:
            raise RuntimeError("connection closed or in use")
        self._closed = True
        return self._sock, self._decoder.take_remaining()

    def close(self) -> None:
        """End the connection now; the agent sees EOF (and stops/kills/detaches).

        A task blocked receiving is woken (it reads EOF) and closes the socket.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._release_if_idle(sending=self._send_lock.locked())

    def _release_if_idle(self, *, sending: bool) -> None:
        """Close the socket once closed and no task waits on it.

        Closing goes through ``call_soon``: the loop's own clean-up of a
        cancelled ``sock_recv_into``/``sock_sendall`` (unregistering the fd) is
        already queued and must run while the fd number still belongs to us.
        """
        if self._closed and not self._receiving and not sending:
            self._loop.call_soon(self._sock.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
