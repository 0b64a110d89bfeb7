"""Interactive TTY sessions: start or reattach, relay bytes, resize, detach."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from kiln.protocol import (
    ExecRequest,
    Frame,
    FrameType,
    SessionInfo,
    decode_exit,
    encode_resize,
)

from .errors import AgentConnectionLost, AgentProtocolError
from .exec import send_chunked
from .transport import Connection, translate_errors

_OUTPUT = (FrameType.STDOUT, FrameType.STDERR)
#: The EXIT code the agent sends a client it detaches because another one attached
#: (a real exit status is never negative: signals are reported as 128+N).
TAKEN_OVER_EXIT = -1


class TtySession:
    """A terminal session in the sandbox, as an async context manager.

    Entering waits for the agent's SESSION_INFO (``info``, ``session_id``).
    Iterating yields output bytes (on reattach the scrollback comes first, as
    one chunk) and ends when the process exits (``exit_code`` is then set),
    after :meth:`detach`, or when another client attaches to the session
    (``taken_over``). Leaving the ``async with`` block detaches: the process
    keeps running in the sandbox and can be reattached by ``session_id``.
    :meth:`kill` sends SIGTERM to its process group.
    """

    __slots__ = (
        "_auth_timeout",
        "_conn",
        "_detached",
        "_exit_code",
        "_opener",
        "_pending",
        "_request",
        "info",
        "taken_over",
    )

    def __init__(
        self,
        opener: Callable[[], Awaitable[Connection]],
        request: ExecRequest,
        auth_timeout: float | None,
    ) -> None:
        self._opener = opener
        self._request = request
        self._auth_timeout = auth_timeout
        self._conn: Connection | None = None
        self._exit_code: int | None = None
        self._detached = False
        # A frame read while waiting for SESSION_INFO that iteration must still see.
        self._pending: Frame | None = None
        #: The agent's SessionInfo (None only if the command could not start).
        self.info: SessionInfo | None = None
        #: True when another client attached and the agent disconnected this one.
        self.taken_over = False

    async def __aenter__(self) -> Self:
        conn = await self._opener()
        self._conn = conn
        try:
            await conn.send(FrameType.EXEC_REQ, self._request.to_payload())
            # The agent answers SESSION_INFO first (new session or reattach), ERROR
            # for an unknown id, or STDERR + EXIT for a command that cannot start.
            frame = await conn.first_answer("SESSION_INFO", self._auth_timeout)
            if frame.type == FrameType.SESSION_INFO:
                with translate_errors("reading SESSION_INFO"):
                    self.info = SessionInfo.from_payload(frame.payload)
            elif frame.type in (*_OUTPUT, FrameType.EXIT) and self._request.session_id is None:
                self._pending = frame
            else:
                raise AgentProtocolError(f"expected SESSION_INFO, got {FrameType(frame.type).name}")
        except BaseException:
            conn.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is None:
            return
        self.detach()

    def _connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("use the session inside 'async with'")
        return self._conn

    @property
    def session_id(self) -> str | None:
        if self.info is not None:
            return self.info.session_id
        return self._request.session_id

    @property
    def exit_code(self) -> int | None:
        """The process's exit code once it has exited (None while running or detached)."""
        return self._exit_code

    # -- input --------------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Type into the terminal (dropped once the session has ended: iteration
        then tells how)."""
        await send_chunked(self._connection(), FrameType.STDIN, data)

    async def resize(self, rows: int, cols: int) -> None:
        payload = encode_resize(rows, cols)
        await self._connection().send(FrameType.RESIZE, payload)

    async def kill(self) -> None:
        """SIGTERM the session's process group; output then ends with its exit code."""
        await self._connection().send(FrameType.KILL)

    def detach(self) -> None:
        """Close the connection; the process keeps running in the sandbox.

        A task iterating the output (in another task) sees the end of it.
        """
        self._detached = True
        self._connection().close()

    # -- output -------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        conn = self._connection()
        while True:
            if self._exit_code is not None or self._detached:
                raise StopAsyncIteration
            frame, self._pending = self._pending, None
            if frame is None:
                frame = await conn.recv()
            if frame is None:
                if self._detached:
                    raise StopAsyncIteration
                raise AgentConnectionLost("the agent closed the terminal connection")
            conn.check_error(frame)
            ftype = frame.type
            if ftype in _OUTPUT:
                return frame.payload
            if ftype == FrameType.EXIT:
                with translate_errors("reading the exit code"):
                    code = decode_exit(frame.payload)
                if code == TAKEN_OVER_EXIT:
                    # Not an exit status: another client attached to the session.
                    self.taken_over = True
                    self.detach()
                else:
                    self._exit_code = code
                raise StopAsyncIteration
            if ftype == FrameType.SESSION_INFO:
                with translate_errors("reading SESSION_INFO"):
                    self.info = SessionInfo.from_payload(frame.payload)
                continue
            raise AgentProtocolError(f"unexpected {FrameType(ftype).name} frame in a TTY session")

    async def wait(self) -> int:
        """Discard output until the process exits; return its exit code."""
        async for _ in self:
            pass
        if self._exit_code is None:
            raise AgentConnectionLost("detached before the session exited")
        return self._exit_code
