"""Relaying a WebSocket between a client of the daemon and a service in a sandbox.

uvicorn terminates the client's WebSocket (ASGI messages); the relay opens a
forward to the service and speaks WebSocket to it with ``websockets``' sans-I/O
client protocol, so both handshakes and all framing are the library's. The
service's handshake answer decides the client's: its subprotocol is accepted,
its refusal (a 403, say) is passed on as an HTTP answer. Messages go both ways
whole (fragments are joined: ASGI has no fragments), pings are answered on
each side by its own library, and a close on either side closes the other
with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from starlette.types import Message, Receive, Scope, Send
from websockets.client import ClientProtocol
from websockets.datastructures import Headers as WsHeaders
from websockets.exceptions import InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from kiln.agent_client import AgentClient, AgentError, ForwardError

from ..streaming import keep_active
from .http_relay import CONNECT_TIMEOUT_S, RelayFailed
from .target import Target, end_to_end, forwarded_request_headers

log = logging.getLogger("kiln.server.proxy")

#: Largest message relayed either way (the daemon's own WebSocket limit).
MAX_MESSAGE = 16 << 20
#: After a close was sent, how long the service has to answer it.
CLOSE_TIMEOUT_S = 5.0
#: Close codes that may not be sent in a close frame (RFC 6455 §7.4.1).
_RESERVED_CODES = frozenset({1005, 1006, 1015})


class _Upstream:
    """The service's side: a socket, the protocol state, and ordered writes."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._write_lock = asyncio.Lock()

    async def flush(self) -> None:
        async with self._write_lock:
            for data in self.protocol.data_to_send():
                if data:
                    await self._loop.sock_sendall(self.sock, data)
                else:  # the protocol's way of saying "half-close now"
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_WR)

    async def receive(self) -> bool:
        """Feed the protocol what the service sent; False at EOF."""
        data = await self._loop.sock_recv(self.sock, 1 << 16)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        await self.flush()  # pongs and close replies
        return bool(data)


async def _handshake(
    client: AgentClient, scope: Scope, target: Target
) -> tuple[_Upstream, Response, list[Frame]]:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            sock, leftover = await client.forward_socket(target.port)
    except ForwardError as exc:
        raise RelayFailed(
            502, f"nothing is listening on port {target.port} in {target.label}"
        ) from exc
    except (AgentError, TimeoutError) as exc:
        raise RelayFailed(502, f"cannot reach port {target.port} in {target.label}: {exc}") from exc
    try:
        try:
            uri = parse_uri(f"ws://127.0.0.1:{target.port}{target.target.decode('latin-1')}")
        except InvalidURI as exc:
            raise RelayFailed(400, f"invalid WebSocket path: {exc}") from exc
        offered = [Subprotocol(p) for p in scope.get("subprotocols", ())]
        protocol = ClientProtocol(uri, subprotocols=offered or None, max_size=MAX_MESSAGE)
        request = protocol.connect()
        for key, value in forwarded_request_headers(scope, target, websocket=True):
            name = key.decode("latin-1")
            if name == "host":
                del request.headers["Host"]
            request.headers[name] = value.decode("latin-1")
        protocol.send_request(request)
        upstream = _Upstream(sock, protocol)
        if leftover:
            protocol.receive_data(leftover)
        await upstream.flush()
        events: list[object] = list(protocol.events_received())
        while not events:
            if not await upstream.receive():
                events = list(protocol.events_received())
                break
            events = list(protocol.events_received())
        response = events[0] if events else None
        if not isinstance(response, Response):
            raise RelayFailed(
                502, f"the service on port {target.port} closed the connection during the handshake"
            )
        frames = [e for e in events[1:] if isinstance(e, Frame)]
        return upstream, response, frames
    except BaseException:
        sock.close()
        raise


async def relay_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    client: AgentClient,
    target: Target,
    touch: Callable[[], None],
) -> None:
    """Relay the WebSocket in ``scope`` to ``target``. RelayFailed before the client
    was answered (the caller refuses the handshake with it). The client's
    ``websocket.connect`` has been received already."""
    upstream, response, early = await _handshake(client, scope, target)
    try:
        if upstream.protocol.handshake_exc is not None or response.status_code != 101:
            await _refuse(send, response)
            return
        accept: Message = {
            "type": "websocket.accept",
            "subprotocol": response.headers.get("Sec-WebSocket-Protocol"),
            "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in _end_to_end(response.headers)
                if not k.lower().startswith("sec-websocket-")
            ],
        }
        await send(accept)
        async with keep_active(touch):
            await _relay(upstream, receive, send, early)
    finally:
        upstream.sock.close()


def _end_to_end(headers: WsHeaders) -> list[tuple[str, str]]:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.raw_items()]
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in end_to_end(raw)]


async def _refuse(send: Send, response: Response) -> None:
    """The service refused the upgrade: the client gets the same answer."""
    headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in _end_to_end(response.headers)
        if k.lower() != "content-length"
    ]
    await send(
        {
            "type": "websocket.http.response.start",
            "status": response.status_code,
            "headers": headers,
        }
    )
    await send({"type": "websocket.http.response.body", "body": response.body or b""})


async def _relay(upstream: _Upstream, receive: Receive, send: Send, early: list[Frame]) -> None:
    protocol = upstream.protocol
    client_closed = asyncio.Event()

    async def to_client() -> None:
        kind: Opcode | None = None
        parts: list[bytes] = []

        async def deliver(frame: Frame) -> None:
            nonlocal kind, parts
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                kind, parts = frame.opcode, [bytes(frame.data)]
            elif frame.opcode is Opcode.CONT and kind is not None:
                parts.append(bytes(frame.data))
            else:
                return  # pings, pongs (answered by the protocol), closes (below)
            if frame.fin:
                data, kind_now = b"".join(parts), kind
                kind, parts = None, []
                if kind_now is Opcode.TEXT:
                    await send({"type": "websocket.send", "text": data.decode("utf-8", "replace")})
                else:
                    await send({"type": "websocket.send", "bytes": data})

        for frame in early:
            await deliver(frame)
        while protocol.state is not State.CLOSED:
            more = await upstream.receive()
            for event in protocol.events_received():
                if isinstance(event, Frame):
                    await deliver(event)
            if not more:
                break
        if not client_closed.is_set():
            close = protocol.close_rcvd
            code = 1000 if close is None or close.code in _RESERVED_CODES else close.code
            reason = "" if close is None else close.reason
            with contextlib.suppress(Exception):  # the client may be gone already
                await send({"type": "websocket.close", "code": code, "reason": reason})

    async def to_service() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                if protocol.state is not State.OPEN:
                    continue
                if message.get("text") is not None:
                    protocol.send_text(message["text"].encode())
                else:
                    protocol.send_binary(message.get("bytes") or b"")
                await upstream.flush()
            elif message["type"] == "websocket.disconnect":
                client_closed.set()
                if protocol.state is State.OPEN:
                    code = int(message.get("code", 1000))
                    if code in _RESERVED_CODES:
                        protocol.send_close()
                    else:
                        protocol.send_close(code, str(message.get("reason") or ""))
                    await upstream.flush()
                return

    service = asyncio.create_task(to_client())
    clientward = asyncio.create_task(to_service())
    try:
        done, _ = await asyncio.wait({service, clientward}, return_when=asyncio.FIRST_COMPLETED)
        if clientward in done and not service.done():
            # Give the service a moment to answer the close, then cut.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(service), CLOSE_TIMEOUT_S)
    finally:
        for task in (service, clientward):
            task.cancel()
        results = await asyncio.gather(service, clientward, return_exceptions=True)
    for result in results:
        if isinstance(result, OSError):
            log.debug("WebSocket relay ended by a connection error: %s", result)
        elif isinstance(result, Exception):
            raise result
