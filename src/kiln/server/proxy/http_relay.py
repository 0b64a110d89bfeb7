"""Relaying one HTTP request to a sandbox port and its response back, streaming both ways.

The request body goes to the service as the client sends it (a 10 MB upload
never sits whole in the daemon) and the response comes back chunk by chunk
(server-sent events arrive as they are sent). While the response streams, the
sandbox counts as active. A client that goes away, at any point after its
request arrived, ends the exchange with the service at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import httpcore
from starlette.types import Message, Receive, Scope, Send

from ..streaming import keep_active
from .pools import Lease, PoolBusy, SandboxPool
from .target import Headers, Target, forwarded_request_headers, forwarded_response_headers, header

log = logging.getLogger("kiln.server.proxy")

#: Opening a forward to the service; reading and writing have no limit (an SSE
#: stream may be silent for minutes, a client may upload slowly).
CONNECT_TIMEOUT_S = 10.0
#: Requests that may be sent again on a new connection when a kept one turns out
#: to have been closed by the service just as it was taken (RFC 9110 §9.2.2).
_REPEATABLE = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


class RelayFailed(Exception):
    """No response could be had from the service; ``status`` says what to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ResponseBrokeOff(Exception):
    """The response had started when the relay failed: the client sees it cut short."""


class ClientGone(Exception):
    pass


class ClientSide:
    """The client's half of ASGI ``receive``: the request body, then a watch for
    ``http.disconnect`` (``gone``) from the moment the body is in."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.watch()
                return

    def watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._until_disconnect())

    async def _until_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch


def _content_length(headers: Headers) -> int | None:
    value = header(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def has_body(headers: Headers) -> bool:
    """Whether a message with ``headers`` carries a body."""
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
    answer to ``send``. RelayFailed before anything was sent to the client,
    ResponseBrokeOff after."""
    client = ClientSide(receive)
    exchange = _exchange(scope, client, send, pool=pool, target=target, touch=touch)
    if not await until_client_gone(client, exchange):
        log.debug("%s: the client went away", target.label)


async def until_client_gone(client: ClientSide, exchange: Coroutine[Any, Any, None]) -> bool:
    """Run ``exchange`` until it ends, or until the client goes away (it is then
    cancelled); False in that case. Its error is raised, :class:`ClientGone` aside."""
    task = asyncio.create_task(exchange)
    gone = asyncio.create_task(client.gone.wait())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
        await client.aclose()
    if task.cancelled():
        return False
    error = task.exception()
    if error is not None and not isinstance(error, ClientGone):
        raise error
    return True


async def _exchange(
    scope: Scope,
    client: ClientSide,
    send: Send,
    *,
    pool: SandboxPool,
    target: Target,
    touch: Callable[[], None],
) -> None:
    headers = forwarded_request_headers(scope, target)
    with_body = has_body(headers)
    if not with_body:
        client.watch()
    request = httpcore.Request(
        scope["method"],
        httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=target.port, target=target.target),
        headers=headers,
        content=client.body() if with_body else None,
        extensions={"timeout": {"connect": CONNECT_TIMEOUT_S, "read": None, "write": None}},
    )
    repeatable = not with_body and scope["method"] in _REPEATABLE
    for attempt in (1, 2):
        try:
            async with pool.connection(target.port, CONNECT_TIMEOUT_S) as lease:
                try:
                    response = await lease.conn.handle_async_request(request)
                except (httpcore.RemoteProtocolError, httpcore.ReadError):
                    if lease.reused and repeatable and attempt == 1:
                        continue
                    raise
                try:
                    await _respond(scope, send, response, lease=lease, target=target, touch=touch)
                finally:
                    await response.aclose()
                return
        except PoolBusy as exc:
            raise RelayFailed(503, str(exc)) from exc
        except (
            httpcore.ConnectError,
            httpcore.ConnectTimeout,
            httpcore.UnsupportedProtocol,
        ) as exc:
            raise RelayFailed(502, str(exc)) from exc
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.TimeoutException) as exc:
            raise RelayFailed(
                502, f"the service on port {target.port} in {target.label} failed to answer: {exc}"
            ) from exc


async def _respond(
    scope: Scope,
    send: Send,
    response: httpcore.Response,
    *,
    lease: Lease,
    target: Target,
    touch: Callable[[], None],
) -> None:
    host = (header(scope["headers"], b"host") or b"").decode("latin-1")
    scheme = str(scope.get("scheme", "http"))
    headers = forwarded_response_headers(response.status, response.headers, target, scheme, host)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    try:
        async with keep_active(touch):
            await stream_body(response, send, lease.release)
    except Exception as exc:
        raise ResponseBrokeOff(f"the response from {target.label} broke off: {exc}") from exc


async def stream_body(
    response: httpcore.Response, send: Send, release: Callable[[], Awaitable[None]]
) -> None:
    """The response's body to the client; ``release`` gives the connection back (to its
    pool) before the last piece goes, once the body is complete."""
    length = _content_length(response.headers)
    stream = response.stream
    assert isinstance(stream, AsyncIterable)  # an async connection's response
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
    await release()
    await send({"type": "http.response.body", "body": last, "more_body": False})
