"""One HTTP exchange relayed to another node, streamed both ways.

The request body goes on as the client sends it and the answer comes back
chunk by chunk (an NDJSON exec's lines as they are produced, a download of any
size without holding it); the client going away at any point ends the
exchange with the other node at once, which ends the work there (a streamed
exec's process is killed as if its client had hung up on that node).
"""

from __future__ import annotations

import httpcore
from starlette.types import Receive, Scope, Send

from ..proxy.http_relay import (
    ClientSide,
    RelayFailed,
    ResponseBrokeOff,
    has_body,
    stream_body,
    until_client_gone,
)
from ..proxy.target import Headers, end_to_end
from .peers import Lease, NodePool, NodeUnreachable

#: Requests that may be sent again on a new connection when a kept one turns out
#: to have been closed by the other node just as it was taken (RFC 9110 §9.2.2).
_REPEATABLE = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


async def relay_to_node(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    pool: NodePool,
    target: bytes,
    headers: Headers,
    response_headers: Headers,
) -> None:
    """Send the request in ``scope`` to ``target`` (path?query) on ``pool``'s node with
    ``headers``, and stream the answer to ``send`` with ``response_headers`` added.
    RelayFailed before anything was sent to the client, ResponseBrokeOff after."""
    client = ClientSide(receive)
    await until_client_gone(
        client,
        _exchange(
            scope,
            client=client,
            send=send,
            pool=pool,
            target=target,
            headers=headers,
            response_headers=response_headers,
        ),
    )


async def _exchange(
    scope: Scope,
    *,
    client: ClientSide,
    send: Send,
    pool: NodePool,
    target: bytes,
    headers: Headers,
    response_headers: Headers,
) -> None:
    with_body = has_body(headers)
    if not with_body:
        client.watch()
    o = pool.origin
    request = httpcore.Request(
        scope["method"],
        httpcore.URL(scheme=o.scheme.encode(), host=o.host.encode(), port=o.port, target=target),
        headers=headers,
        content=client.body() if with_body else None,
        extensions={"timeout": {"connect": None, "read": None, "write": None}},
    )
    repeatable = not with_body and scope["method"] in _REPEATABLE
    where = f"node {pool.name!r} ({o.host}:{o.port})"
    for attempt in (1, 2):
        try:
            async with pool.connection() as lease:
                try:
                    response = await lease.conn.handle_async_request(request)
                except (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError):
                    if lease.reused and repeatable and attempt == 1:
                        continue
                    raise
                try:
                    await _respond(send, response, lease, response_headers, where)
                finally:
                    await response.aclose()
                return
        except NodeUnreachable as exc:
            raise RelayFailed(502, f"{where} cannot be reached: {exc}") from exc
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.TimeoutException) as exc:
            raise RelayFailed(502, f"{where} failed to answer: {exc}") from exc


async def _respond(
    send: Send, response: httpcore.Response, lease: Lease, extra: Headers, where: str
) -> None:
    headers = [
        (k, v) for k, v in end_to_end(response.headers) if k.lower() not in (b"date", b"server")
    ]
    await send(
        {"type": "http.response.start", "status": response.status, "headers": headers + extra}
    )
    try:
        await stream_body(response, send, lease.release)
    except Exception as exc:
        raise ResponseBrokeOff(f"the response from {where} broke off: {exc}") from exc
