"""A web app that runs INSIDE a test VM, on the guest's own python3 (stdlib only,
plus the host's ``websockets`` package copied next to it for the echo server).

    python3 guest_web.py HTTP_PORT WS_PORT

HTTP (HTTP/1.1, keep-alive): ``/echo...`` the request as JSON; ``POST /upload``
sha256 and size of the body (Content-Length or chunked); ``/redirect`` → 302
``/login``; ``/sse`` three events, the last two only once ``/tmp/release``
exists. WebSocket on WS_PORT: echo, subprotocol ``chat`` accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from websockets.sync.server import serve  # in the guest: the copy next to this file


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, data: object, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        if self.path.startswith("/echo"):
            self._json({"path": self.path, "headers": dict(self.headers.items())})
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/login")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                if i == 1:
                    while not os.path.exists("/tmp/release"):
                        time.sleep(0.05)
                event = f"data: event {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._json({"error": "no such page"}, 404)

    def do_POST(self) -> None:
        body = self._body()
        self._json({"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)})


def websocket_echo(port: int) -> None:
    def echo(ws) -> None:  # type: ignore[no-untyped-def]
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", port, subprotocols=["chat"], max_size=None) as server:
        server.serve_forever()


if __name__ == "__main__":
    http_port, ws_port = int(sys.argv[1]), int(sys.argv[2])
    threading.Thread(target=websocket_echo, args=(ws_port,), daemon=True).start()
    ThreadingHTTPServer(("127.0.0.1", http_port), Handler).serve_forever()
