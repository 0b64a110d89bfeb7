"""A real web service for the proxy tests: uvicorn on a loopback port, in a thread.

A test-mode agent shares the test's network, so this service is "inside the
sandbox" for the agent's forward channel. Routes:

- ``/echo/...``: the request as JSON (method, raw path, query, headers, peer)
- ``/upload``: sha256 and length of the streamed request body
- ``/redirect?to=X``: 302 to X
- ``/sse?n=N``: N server-sent events; after the first it waits for ``release``
- ``/big?mb=N``: N MiB of bytes, streamed in 64 KiB chunks
- ``/ws``: WebSocket echo (subprotocol ``chat`` accepted), ``/ws-deny``: 403
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.types import Receive, Scope, Send

from kiln.server.daemon import bind_socket

CHUNK = b"k" * 65536


class Upstream:
    def __init__(self) -> None:
        self.port = 0
        self.release = threading.Event()  # lets /sse finish
        self.sse_done = threading.Event()
        self.hold_gone = threading.Event()  # /hold saw its client disconnect
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # --- the ASGI app ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        self.requests += 1
        path = scope["path"]
        query = dict(parse_qsl(scope["query_string"].decode()))
        if path.startswith("/echo"):
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            data = {
                "method": scope["method"],
                "raw_path": scope["raw_path"].decode(),
                "query": scope["query_string"].decode(),
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "peer": list(scope["client"] or []),
                "body": body.decode(errors="replace"),
            }
            extra = [(b"x-upstream", b"yes"), (b"connection", b"x-secret"), (b"x-secret", b"no")]
            await _json(send, data, extra)
        elif path == "/upload":
            digest, size, chunks = hashlib.sha256(), 0, 0
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                digest.update(chunk)
                size += len(chunk)
                chunks += 1
                if not message.get("more_body"):
                    break
            await _json(send, {"sha256": digest.hexdigest(), "size": size, "chunks": chunks})
        elif path == "/redirect":
            location = query.get("to", "/")
            await send(
                {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [(b"location", location.encode())],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        elif path == "/hold":
            # Answers nothing until the client goes away.
            while (await receive())["type"] != "http.disconnect":
                pass
            self.hold_gone.set()
        elif path == "/status":
            code = int(query.get("code", "200"))
            headers = [(b"content-length", query.get("length", "0").encode())]
            headers += [
                (b"set-cookie", c.encode()) for c in query.get("cookies", "").split("|") if c
            ]
            await send({"type": "http.response.start", "status": code, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/sse":
            await self._sse(send, int(query.get("n", "3")))
        elif path == "/big":
            total = int(query.get("mb", "1")) << 20
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(total).encode())],
                }
            )
            sent = 0
            while sent < total:
                piece = CHUNK[: min(len(CHUNK), total - sent)]
                sent += len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": sent < total})
        else:
            await _json(send, {"error": "no such page"}, status=404)

    async def _sse(self, send: Send, n: int) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(n):
            event = f"id: {i}\ndata: event {i}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            if i == 0:
                # The test sees event 0 while this stream is still open.
                await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        await send({"type": "http.response.body", "body": b""})
        self.sse_done.set()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "websocket.connect"
        if scope["path"] == "/ws-deny":
            body = b'{"error": "go away"}'
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return
        subprotocol = "chat" if "chat" in scope.get("subprotocols", []) else None
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await send(
            {
                "type": "websocket.send",
                "text": json.dumps({"hello": headers, "path": scope["raw_path"].decode()}),
            }
        )
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text == "close-me":
                await send({"type": "websocket.close", "code": 4001, "reason": "asked to"})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})

    # --- running it -----------------------------------------------------------------

    def start(self) -> Upstream:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("upstream did not start")
        return self

    async def _serve(self) -> None:
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.get_running_loop()
        server = uvicorn.Server(
            uvicorn.Config(
                self, lifespan="off", log_level="warning", access_log=False, proxy_headers=False
            )
        )
        self._server = server
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._ready.set()
        await task

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)


async def _json(
    send: Send, data: Any, extra: list[tuple[bytes, bytes]] | None = None, status: int = 200
) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})
