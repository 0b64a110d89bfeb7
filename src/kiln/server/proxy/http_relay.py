"""Relaying one HTTP request to a sandbox port and its response back, streaming both ways.

The request body goes to the service as the client sends it (a 10 MB upload
never sits whole in the daemon) and the response comes back chunk by chunk
(server-sent events arrive as they are sent). While the response streams, the
sandbox counts as active, and a client that goes away ends the upstream request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable

import httpcore
from starlette.types import Message, Receive, Scope, Send

from ..streaming import keep_active
from .pools import Lease, SandboxPool
from .target import Headers, Target, forwarded_request_headers, forwarded_response_headers, header

log = logging.getLogger("kiln.server.proxy")

#: Opening a forward to the service; reading and writing have no limit (an SSE
#: stream may be silent for minutes, a client may upload slowly).
CONNECT_TIMEOUT_S = 10.0


class ClientGone(Exception):
    """The client disconnected; nothing more can be sent to it."""


class RelayFailed(Exception):
    """No response could be had from the service; ``status`` says what to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _await_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _content_length(headers: Headers) -> int | None:
    value = header(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _has_body(headers: Headers) -> bool:
    return header(headers, b"content-length") not in (None, b"0") or (
        header(headers, b"transfer-encoding") is not None
    )


async def relay_http(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    pool: SandboxPool,
    target: Target,
    touch: Callable[[], None],
) -> None:
    """Send the request in ``scope`` to ``target`` through ``pool`` and stream the
    answer to ``send``. RelayFailed before anything was sent to the client."""
    headers = forwarded_request_headers(scope, target)
    has_body = _has_body(headers)
    request = httpcore.Request(
        scope["method"],
        httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=target.port, target=target.target),
        headers=headers,
        content=_request_body(receive) if has_body else None,
        extensions={"timeout": {"connect": CONNECT_TIMEOUT_S, "read": None, "write": None}},
    )
    for attempt in (1, 2):
        try:
            async with pool.connection(target.port, CONNECT_TIMEOUT_S) as lease:
                try:
                    response = await lease.conn.handle_async_request(request)
                except (httpcore.RemoteProtocolError, httpcore.ReadError):
                    # A kept connection the service closed just as it was taken: once
                    # more on a new one, if the request can be sent again.
                    if lease.reused and not has_body and attempt == 1:
                        continue
                    raise
                try:
                    await _respond(
                        scope, receive, send, response, lease=lease, target=target, touch=touch
                    )
                finally:
                    await response.aclose()
                return
        except ClientGone:
            return
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            raise RelayFailed(502, str(exc)) from exc
        except httpcore.UnsupportedProtocol as exc:
            raise RelayFailed(502, str(exc)) from exc
        except _Answered:
            raise
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.TimeoutException) as exc:
            raise RelayFailed(
                502, f"the service on port {target.port} in {target.label} failed to answer: {exc}"
            ) from exc


class _Answered(Exception):
    """The response had started when the relay failed: nothing more can be said."""


async def _respond(
    scope: Scope,
    receive: Receive,
    send: Send,
    response: httpcore.Response,
    *,
    lease: Lease,
    target: Target,
    touch: Callable[[], None],
) -> None:
    host = (header(scope["headers"], b"host") or b"").decode("latin-1")
    scheme = str(scope.get("scheme", "http"))
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": forwarded_response_headers(response.headers, target, scheme, host),
        }
    )
    try:
        async with keep_active(touch):
            await _stream_body(response, receive, send, lease)
    except Exception as exc:
        raise _Answered(f"the response from {target.label} broke off: {exc}") from exc


async def _stream_body(
    response: httpcore.Response, receive: Receive, send: Send, lease: Lease
) -> None:
    """The response body to the client, until the end or until the client leaves."""

    length = _content_length(response.headers)

    async def pump() -> None:
        stream = response.stream
        assert isinstance(stream, AsyncIterable)  # an async pool's response
        sent, last = 0, b""
        async for chunk in stream:
            sent += len(chunk)
            if length is not None and sent >= length:
                # The body is complete and its end follows at once (h11 needs no more
                # input): hold the last piece until the connection is back in the
                # pool, or the client's next request would find it still busy.
                last = chunk
                continue
            if chunk:
                message: Message = {"type": "http.response.body", "body": chunk, "more_body": True}
                await send(message)
        await response.aclose()
        await lease.release()
        await send({"type": "http.response.body", "body": last, "more_body": False})

    pumping = asyncio.create_task(pump())
    watching = asyncio.create_task(_await_disconnect(receive))
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)
    if pumping.cancelled():
        log.debug("the client went away while the response streamed")
        return
    error = pumping.exception()
    if error is not None:
        # The response has started: all that can be told to the client is a cut.
        raise error
