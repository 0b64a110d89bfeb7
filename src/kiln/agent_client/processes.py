"""Background processes: start, list, read output (replay + live), stdin, signals.

A background process runs detached from every connection (see
:mod:`kiln.protocol.processes`); these calls each use one control connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from kiln.protocol import (
    Frame,
    FrameType,
    ProcessAttach,
    ProcessInfo,
    ProcessStatus,
    Reason,
    decode_exit,
)

from .errors import (
    AgentProtocolError,
    CannotStart,
    NoTerminal,
    ProcessFinished,
    ProcessNotFound,
    RemoteError,
)
from .exec import ExecEvent, Exit, Stderr, Stdout
from .transport import Connection, translate_errors


def status_error(status: ProcessStatus, pid: int | None) -> RemoteError:
    """The AgentError a PROC_STATUS error stands for."""
    message = status.message or "process request failed"
    if status.reason == Reason.NOT_FOUND:
        return ProcessNotFound(message, pid)
    if status.reason == Reason.FINISHED:
        return ProcessFinished(message, pid)
    if status.reason == Reason.NO_TERMINAL:
        return NoTerminal(message, pid)
    if status.reason == Reason.CANNOT_START:
        return CannotStart(message, status.exit_code)
    return RemoteError(message)


def check_status(frame: Frame, pid: int | None) -> None:
    """Raise the error of a PROC_STATUS error frame (no-op for other frames)."""
    if frame.type != FrameType.PROC_STATUS:
        return
    with translate_errors("reading PROC_STATUS"):
        status = ProcessStatus.from_payload(frame.payload)
    if not status.ok:
        raise status_error(status, pid)


def process_info(frame: Frame, pid: int | None) -> ProcessInfo:
    """The ProcessInfo of a PROC_INFO answer (PROC_STATUS errors raised)."""
    check_status(frame, pid)
    if frame.type != FrameType.PROC_INFO:
        raise AgentProtocolError(f"expected PROC_INFO, got {FrameType(frame.type).name}")
    with translate_errors("reading PROC_INFO"):
        return ProcessInfo.from_payload(frame.payload)


class ProcessOutput:
    """A reader of a background process's output, as an async context manager.

    Iterate it for :class:`Stdout`/:class:`Stderr` events (the output kept so
    far, then live output) and a final :class:`Exit`. Without ``follow`` the
    iteration ends after what is kept (with an Exit only if the process had
    finished). Leaving early only detaches this reader: the process keeps running.
    """

    __slots__ = ("_conn", "_done", "_exit_code", "_opener", "_request", "_timeout", "info")

    def __init__(
        self,
        opener: Callable[[], Awaitable[Connection]],
        request: ProcessAttach,
        first_answer_timeout: float | None,
    ) -> None:
        self._opener = opener
        self._request = request
        self._timeout = first_answer_timeout
        self._conn: Connection | None = None
        self._exit_code: int | None = None
        self._done = False
        #: The process as it was when this reader attached.
        self.info: ProcessInfo | None = None

    async def __aenter__(self) -> Self:
        conn = await self._opener()
        self._conn = conn
        try:
            await conn.send(FrameType.PROC_ATTACH, self._request.to_payload())
            frame = await conn.first_answer("PROC_INFO", self._timeout)
            self.info = process_info(frame, self._request.pid)
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
        if self._conn is not None:
            self._conn.close()

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ExecEvent:
        if self._exit_code is not None or self._done:
            raise StopAsyncIteration
        if self._conn is None:
            raise RuntimeError("use the reader inside 'async with'")
        frame = await self._conn.recv_answer("the exit code")
        ftype = frame.type
        if ftype == FrameType.PROC_STATUS and not self._request.follow:
            check_status(frame, self._request.pid)
            self._done = True  # all that was kept; the process runs on
            raise StopAsyncIteration
        if ftype == FrameType.STDOUT:
            return Stdout(frame.payload)
        if ftype == FrameType.STDERR:
            return Stderr(frame.payload)
        if ftype == FrameType.EXIT:
            with translate_errors("reading the exit code"):
                self._exit_code = decode_exit(frame.payload)
            return Exit(self._exit_code)
        raise AgentProtocolError(f"unexpected {FrameType(ftype).name} frame in process output")
