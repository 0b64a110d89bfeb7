"""The one adapter between kiln and ``qemu.qmp``: timeouts and error translation.

Every call is bounded by a timeout. ``qemu.qmp``'s exceptions become engine
errors here and nowhere else:

- the server answered with an error (``ExecuteError``)      → :class:`QmpCommandError`
- the connection is gone or never came up (EOF, ``ConnectError``,
  ``ExecInterruptedError``, ``StateError``, ``OSError``)  → :class:`SandboxCrashed`
- no answer in time                                        → :class:`SandboxCrashed`

A hung QEMU is treated like a dead one: the caller marks the sandbox broken
instead of waiting forever. ``CancelledError`` is never caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from ..errors import EngineError, SandboxCrashed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 10.0
#: sockaddr_un.sun_path is 108 bytes including the trailing NUL.
_MAX_UNIX_PATH: Final = 107


def _no_events(event: object) -> bool:
    return False


class QmpCommandError(EngineError):
    """QEMU refused a QMP command (it is alive and answered with an error)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class


@contextlib.contextmanager
def _unix_path(path: Path) -> Any:
    """A path to ``path`` short enough for ``connect`` (via /proc/self/fd for long ones)."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= _MAX_UNIX_PATH:
        yield text
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


def connect_unix(path: Path) -> socket.socket:
    """A connected, non-blocking Unix stream socket (long paths are fine)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _unix_path(path) as short:
            sock.connect(short)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class QMP:
    """A QMP session with one QEMU process (``name`` is used in messages)."""

    def __init__(self, name: str, socket_path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.socket_path = socket_path
        self.timeout = timeout
        self._client: QMPClient | None = None

    def __repr__(self) -> str:
        return f"QMP({self.name!r}, {os.fspath(self.socket_path)!r})"

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.runstate.name == "RUNNING"

    @contextlib.asynccontextmanager
    async def _translate(self, what: str, within: float | None) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.timeout if within is None else within):
                yield
        except TimeoutError:
            raise SandboxCrashed(f"QEMU of {self.name} did not answer {what} in time") from None
        except ExecuteError as exc:
            raise QmpCommandError(what, exc.error_class, str(exc)) from exc
        except (ExecInterruptedError, ConnectError, EOFError, QMPError, OSError) as exc:
            raise SandboxCrashed(f"QEMU of {self.name} is gone ({what}: {exc})") from exc

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Connect and negotiate capabilities (the socket must exist already)."""
        if self._client is not None:
            await self.close()
        client = QMPClient(self.name)
        # Nobody reads events; the catch-all listener (which cannot be removed) would
        # otherwise keep every STOP/RESUME event forever.
        client.events.event_filter = _no_events
        async with self._translate("connect", timeout):
            sock = await asyncio.to_thread(connect_unix, self.socket_path)
            try:
                await client.connect(sock)
            except BaseException:
                sock.close()
                raise
        self._client = client

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        client = self._client
        if client is None:
            raise SandboxCrashed(f"no QMP connection to the QEMU of {self.name}")
        async with self._translate(command, timeout):
            return await client.execute(command, dict(arguments) if arguments else None)

    async def send_fd(self, fd: int, fdname: str, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Pass ``fd`` to QEMU under ``fdname`` (``getfd``), for ``fd:NAME`` URIs."""
        client = self._client
        if client is None:
            raise SandboxCrashed(f"no QMP connection to the QEMU of {self.name}")
        async with self._translate("getfd", timeout):
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": fdname})

    async def quit(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Ask QEMU to exit. The hang-up that follows is the expected answer."""
        client = self._client
        if client is None:
            return
        try:
            async with self._translate("quit", timeout):
                await client.execute("quit")
        except SandboxCrashed:
            pass  # QEMU may close the socket before the reply gets out
        finally:
            await self.close()

    async def close(self) -> None:
        """Drop the connection; errors from a peer that already left are expected."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await client.disconnect()
        except TimeoutError:
            log.warning("QMP disconnect from %s timed out", self.name)
        except (EOFError, QMPError, OSError) as exc:
            log.debug("QMP disconnect from %s: %r", self.name, exc)
