"""A directory watch: FILE_EVENT frames as an async iterator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from kiln.protocol import FileEvent, FrameType, StatusResponse, WatchRequest

from .errors import AgentConnectionLost, AgentProtocolError, RemoteError
from .transport import Connection, translate_errors


class DirWatch:
    """``async with client.watch_dir(path) as watch: async for event in watch``.

    Entering the block returns once the agent watches (errors such as a missing
    directory are raised there). Iteration ends when the watched directory is
    deleted; leaving the block ends the watch in the agent.
    """

    __slots__ = ("_auth_timeout", "_conn", "_done", "_opener", "_request")

    def __init__(
        self,
        opener: Callable[[], Awaitable[Connection]],
        request: WatchRequest,
        auth_timeout: float | None,
    ) -> None:
        self._opener = opener
        self._request = request
        self._auth_timeout = auth_timeout
        self._conn: Connection | None = None
        self._done = False

    async def __aenter__(self) -> Self:
        conn = await self._opener()
        self._conn = conn
        try:
            await conn.send(FrameType.FILE_WATCH_REQ, self._request.to_payload())
            frame = await conn.first_answer("FILE_WATCH_RESP", self._auth_timeout)
            if frame.type != FrameType.FILE_WATCH_RESP:
                raise AgentProtocolError(
                    f"expected FILE_WATCH_RESP, got {FrameType(frame.type).name}"
                )
            with translate_errors("reading FILE_WATCH_RESP"):
                status = StatusResponse.from_payload(frame.payload)
            if not status.ok:
                raise RemoteError(status.message or "the watch failed")
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
        self.close()

    def close(self) -> None:
        """End the watch (the agent sees the connection close)."""
        if self._conn is not None:
            self._conn.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FileEvent:
        if self._done:
            raise StopAsyncIteration
        if self._conn is None:
            raise RuntimeError("use the watch inside 'async with'")
        while True:
            frame = await self._conn.recv()
            if frame is None:
                raise AgentConnectionLost("the agent closed the connection during a watch")
            self._conn.check_error(frame)
            if frame.type == FrameType.FILE_EVENT:
                with translate_errors("reading FILE_EVENT"):
                    return FileEvent.from_payload(frame.payload)
            if frame.type == FrameType.EXIT:
                self._done = True  # the watched directory is gone
                raise StopAsyncIteration
            raise AgentProtocolError(f"unexpected {FrameType(frame.type).name} during a watch")
