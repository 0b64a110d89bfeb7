"""Interactive terminals over the daemon's WebSocket: :class:`ShellSession` and its async twin.

Binary messages both ways are terminal bytes; the client sends
``{"type": "resize", "rows": R, "cols": C}`` as a text message. The daemon
names the session in the upgrade's ``X-Kiln-Session-Id`` header and, when the
shell exits, closes with code 1000 and the reason ``exit <code>``. Closing the
socket detaches: the session keeps running and can be reattached with
``sandbox.shell(session_id=...)``, which replays its scrollback.

websockets exceptions are translated here, once, into :mod:`kiln.sdk.errors`.
The SDK imports this module only when a shell is opened (websockets is slow to import).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Self

from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as sync_connect

from ._api import auth_headers, error_message
from .errors import ConnectionError, KilnError, Timeout, error_for_status

#: Response header of the WebSocket upgrade naming the TTY session.
SESSION_HEADER = "X-Kiln-Session-Id"


def exit_code_from_close(code: int | None, reason: str) -> int | None:
    """The shell's exit code from the daemon's close frame (1000, ``"exit <code>"``)."""
    if code != 1000 or not reason.startswith("exit "):
        return None
    try:
        return int(reason[5:])
    except ValueError:
        return None


def resize_message(rows: int, cols: int) -> str:
    """The text message that resizes the terminal."""
    if not (0 < rows <= 0xFFFF and 0 < cols <= 0xFFFF):
        raise ValueError(f"terminal size out of range: {rows}x{cols}")
    return json.dumps({"type": "resize", "rows": rows, "cols": cols})


def _translate(exc: BaseException, url: str) -> KilnError:
    """The kiln error for an exception raised while opening the WebSocket."""
    if isinstance(exc, InvalidStatus):
        resp = exc.response
        message = error_message(resp.status_code, bytes(resp.body or b""), resp.reason_phrase)
        return error_for_status(resp.status_code, message)
    if isinstance(exc, TimeoutError):
        return Timeout(f"opening the shell at {url} timed out")
    if isinstance(exc, OSError):
        return ConnectionError(f"cannot reach the kiln daemon for a shell at {url}: {exc}")
    if isinstance(exc, InvalidURI):
        return KilnError(f"invalid shell URL {url}: {exc}")
    if isinstance(exc, InvalidHandshake):
        return ConnectionError(f"the shell WebSocket handshake failed: {exc}")
    return ConnectionError(f"the shell WebSocket failed: {exc!r}")


_OPEN_ERRORS = (OSError, TimeoutError, WebSocketException)


class _State:
    """What both session kinds learn from the daemon: the session id and how it ended."""

    session_id: str | None
    #: The shell's exit code, once the daemon closed the socket because it exited.
    exit_code: int | None
    #: The daemon's reason when it closed the socket on an error (code 1011).
    error: str | None

    def _closed(self, exc: ConnectionClosed) -> None:
        frame = exc.rcvd
        if frame is None:
            return
        self.exit_code = exit_code_from_close(frame.code, frame.reason)
        if frame.code == 1011:
            self.error = frame.reason or "the session failed"


class ShellSession(_State):
    """A live terminal in a sandbox (blocking I/O).

    ``send`` keystrokes, ``recv`` output, ``resize`` the window, ``close`` to
    detach. ``session_id`` names the TTY session for reattaching; ``exit_code``
    is set once the shell's process ended.
    """

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self._ws = ws
        self._url = url
        self.session_id = ws.response.headers.get(SESSION_HEADER) if ws.response else None
        self.exit_code = None
        self.error = None

    @classmethod
    def connect(cls, url: str, token: str | None, *, open_timeout: float = 60.0) -> ShellSession:
        """Open the WebSocket at ``url`` (see :meth:`Sandbox.shell`)."""

        try:
            ws = sync_connect(
                url,
                additional_headers=auth_headers(token),
                open_timeout=open_timeout,
                compression=None,
                max_size=None,
                proxy=None,
            )
        except _OPEN_ERRORS as exc:
            raise _translate(exc, url) from exc
        # Entering the connection's context marks it as owned (websockets >= 17.1
        # warns about a bare connect()); close() below is its exit.
        return cls(ws.__enter__(), url)

    def send(self, data: bytes | str) -> None:
        """Send terminal input (text is UTF-8 encoded)."""

        try:
            self._ws.send(data.encode() if isinstance(data, str) else data)
        except ConnectionClosed as exc:
            raise ConnectionError("the shell connection is closed") from exc

    def resize(self, rows: int, cols: int) -> None:
        """Tell the session's terminal its new size."""

        try:
            self._ws.send(resize_message(rows, cols))
        except ConnectionClosed as exc:
            raise ConnectionError("the shell connection is closed") from exc

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next terminal output; ``b""`` if none arrived within ``timeout``; ``None`` at end."""

        while True:
            try:
                message = self._ws.recv(timeout)
            except TimeoutError:
                return b""
            except ConnectionClosed as exc:
                self._closed(exc)
                return None
            if isinstance(message, bytes):
                return message
            # Text messages from the daemon carry nothing a client needs today.

    def __iter__(self) -> Iterator[bytes]:
        while (data := self.recv()) is not None:
            yield data

    def close(self) -> None:
        """Detach: close the WebSocket; the session keeps running in the sandbox."""
        self._ws.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncShellSession(_State):
    """A live terminal in a sandbox (asyncio). Same API as :class:`ShellSession`, awaited."""

    def __init__(self, ws: AsyncConnection, url: str) -> None:
        self._ws = ws
        self._url = url
        self.session_id = ws.response.headers.get(SESSION_HEADER) if ws.response else None
        self.exit_code = None
        self.error = None

    @classmethod
    async def connect(
        cls, url: str, token: str | None, *, open_timeout: float = 60.0
    ) -> AsyncShellSession:
        """Open the WebSocket at ``url`` (see :meth:`AsyncSandbox.shell`)."""

        try:
            ws = await async_connect(
                url,
                additional_headers=auth_headers(token),
                open_timeout=open_timeout,
                compression=None,
                max_size=None,
                proxy=None,
            )
        except _OPEN_ERRORS as exc:
            raise _translate(exc, url) from exc
        return cls(ws, url)

    async def send(self, data: bytes | str) -> None:
        """Send terminal input (text is UTF-8 encoded)."""

        try:
            await self._ws.send(data.encode() if isinstance(data, str) else data)
        except ConnectionClosed as exc:
            raise ConnectionError("the shell connection is closed") from exc

    async def resize(self, rows: int, cols: int) -> None:
        """Tell the session's terminal its new size."""

        try:
            await self._ws.send(resize_message(rows, cols))
        except ConnectionClosed as exc:
            raise ConnectionError("the shell connection is closed") from exc

    async def recv(self) -> bytes | None:
        """The next terminal output; ``None`` once the connection closed."""

        while True:
            try:
                message = await self._ws.recv()
            except ConnectionClosed as exc:
                self._closed(exc)
                return None
            if isinstance(message, bytes):
                return message
            # Text messages from the daemon carry nothing a client needs today.

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while (data := await self.recv()) is not None:
            yield data

    async def close(self) -> None:
        """Detach: close the WebSocket; the session keeps running in the sandbox."""
        await self._ws.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


__all__ = ["AsyncShellSession", "ShellSession", "exit_code_from_close", "resize_message"]
