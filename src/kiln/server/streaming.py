"""A streaming response that notices a client going away even while nothing is sent.

Starlette's ``StreamingResponse`` under ASGI 2.4 only learns about a
disconnect when a write fails, so a silent command (``sleep 600``) would keep
running after its client hung up. :class:`LiveStream` listens for
``http.disconnect`` while it streams and then cancels the producer, and always
closes the producing async generator, so whatever the generator holds (an
exec connection: closing it makes the agent SIGKILL the process group) is
released at once; ``on_close`` runs last, whatever happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class LiveStream(Response):
    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        *,
        status_code: int = 200,
        media_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.body_iterator = content
        self.on_close = on_close
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def _stream(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": self.raw_headers,
            }
        )
        async for chunk in self.body_iterator:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.create_task(self._stream(send))
        watch = asyncio.create_task(self._wait_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stream.cancel()
            watch.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            # Also when the producer never started (the client left at once).
            await self.body_iterator.aclose()
            if self.on_close is not None:
                await self.on_close()
        if stream.cancelled():
            return
        exc = stream.exception()
        # A client that went away mid-write is not an error of ours; anything else
        # after the response started can only be logged (the server does that).
        if exc is not None and not isinstance(exc, OSError):
            raise exc


#: While a command runs, host-side activity is recorded this often (seconds), so the
#: thermal manager never pauses a sandbox in the middle of a silent command.
KEEPALIVE_S = 5.0


@asynccontextmanager
async def keep_active(touch: Callable[[], None], every: float = KEEPALIVE_S) -> AsyncIterator[None]:
    """Call ``touch`` now and every ``every`` seconds until the block ends."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(every)
            touch()

    touch()
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        touch()
