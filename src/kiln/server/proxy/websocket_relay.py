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

from kiln.agent_client import AgentClient, AgentError, ForwardError, ForwardStream

from ..streaming import keep_active
from .http_relay import CONNECT_TIMEOUT_S, RelayFailed, ResponseBrokeOff
from .target import Headers as HeaderList
from .target import Target, end_to_end, forwarded_request_headers

log = logging.getLogger("kiln.server.proxy")

#: Largest message relayed either way (the daemon's own WebSocket limit).
MAX_MESSAGE = 16 << 20
#: After a close was sent, how long the service has to answer it.
CLOSE_TIMEOUT_S = 5.0
#: Close codes that may not be sent in a close frame (RFC 6455 §7.4.1).
_RESERVED_CODES = frozenset({1005, 1006, 1015})


class _Upstream:
    """The service's side: the forwarded stream and the protocol state.

    Writes never block the reading side: what the protocol answers by itself
    (pongs, the reply to a close) is queued on the transport, and only the
    client-to-service direction waits for the buffer to drain, so a service
    that is busy writing to us is always read.
    """

    def __init__(self, stream: ForwardStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol

    def push(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.stream.write(data)
            elif not self.stream.writer.is_closing():  # "half-close now"
                with contextlib.suppress(OSError, AgentError):
                    self.stream.write_eof()

    async def flush(self) -> None:
        self.push()
        await self.stream.drain()

    async def receive(self) -> bool:
        """Feed the protocol what the service sent; False at EOF."""
        data = await self.stream.read(1 << 16)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        self.push()
        return bool(data)


async def _handshake(
    client: AgentClient, scope: Scope, target: Target
) -> tuple[_Upstream, Response, list[Frame]]:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            stream = await client.forward(target.port)
    except ForwardError as exc:
        raise RelayFailed(
            502, f"nothing is listening on port {target.port} in {target.label}"
        ) from exc
    except (AgentError, TimeoutError) as exc:
        raise RelayFailed(502, f"cannot reach port {target.port} in {target.label}: {exc}") from exc
    return await _upgrade(
        stream,
        scope,
        f"ws://127.0.0.1:{target.port}{target.target.decode('latin-1')}",
        forwarded_request_headers(scope, target, websocket=True),
        f"the service on port {target.port}",
    )


async def _upgrade(
    stream: ForwardStream, scope: Scope, uri_text: str, headers: HeaderList, what: str
) -> tuple[_Upstream, Response, list[Frame]]:
    """The WebSocket handshake over ``stream`` (aborted if it fails): the upstream, its
    answer, and the frames that came right behind the answer."""
    try:
        try:
            uri = parse_uri(uri_text)
        except InvalidURI as exc:
            raise RelayFailed(400, f"invalid WebSocket path: {exc}") from exc
        offered = [Subprotocol(p) for p in scope.get("subprotocols", ())]
        protocol = ClientProtocol(uri, subprotocols=offered or None, max_size=MAX_MESSAGE)
        request = protocol.connect()
        for key, value in headers:
            name = key.decode("latin-1")
            if name == "host":
                del request.headers["Host"]
            request.headers[name] = value.decode("latin-1")
        protocol.send_request(request)
        upstream = _Upstream(stream, protocol)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await upstream.flush()
                events: list[object] = []
                while not events:
                    more = await upstream.receive()
                    events = list(protocol.events_received())
                    if not more:
                        break
        except TimeoutError as exc:
            raise RelayFailed(504, f"{what} did not answer the WebSocket handshake") from exc
        response = events[0] if events else None
        if not isinstance(response, Response):
            raise RelayFailed(502, f"{what} closed the connection during the handshake")
        frames = [e for e in events[1:] if isinstance(e, Frame)]
        return upstream, response, frames
    except BaseException:
        stream.abort()
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
    await _serve(upstream, response=response, early=early, receive=receive, send=send, touch=touch)


async def relay_websocket_over(
    stream: ForwardStream,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    uri: str,
    headers: HeaderList,
    what: str,
    touch: Callable[[], None] | None = None,
) -> None:
    """Relay the WebSocket in ``scope`` over an open byte ``stream`` (another daemon,
    say) to ``uri``, with exactly ``headers`` added to the handshake; ``what`` names
    the other end in errors. RelayFailed before the client was answered."""
    upstream, response, early = await _upgrade(stream, scope, uri, headers, what)
    await _serve(upstream, response=response, early=early, receive=receive, send=send, touch=touch)


async def _serve(
    upstream: _Upstream,
    *,
    response: Response,
    early: list[Frame],
    receive: Receive,
    send: Send,
    touch: Callable[[], None] | None,
) -> None:
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
        if touch is None:
            await _relay(upstream, receive, send, early)
        else:
            async with keep_active(touch):
                await _relay(upstream, receive, send, early)
    finally:
        upstream.stream.abort()


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


def _close_for_client(protocol: ClientProtocol) -> tuple[int, str]:
    """The close the client gets when the service's side ended: the service's own
    close, else the one the protocol sent it (1009 for a message too big, say),
    else 1011 (the connection just ended: 1006 cannot be sent)."""
    for close in (protocol.close_rcvd, protocol.close_sent):
        if close is not None and close.code not in _RESERVED_CODES:
            return close.code, close.reason
    return 1011, "the service closed the connection"


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
            code, reason = _close_for_client(protocol)
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
        if isinstance(result, OSError | AgentError):
            log.debug("WebSocket relay ended by a connection error: %s", result)
        elif isinstance(result, Exception):
            raise ResponseBrokeOff(f"WebSocket relay failed: {result}") from result
