"""Transport retries and per-call options, against a scripted HTTP server on loopback.

The server is real HTTP on a real socket, answering from a script, because what
is tested is what the client does with a refused connection or a 503: a real
daemon cannot be told to answer 503 on cue.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kiln.sdk import AsyncKiln, ConnectionError, Kiln, Timeout, Unavailable

HEALTH = {"status": "ok", "sandboxes": 0, "uptime_s": 1.0, "engine": "qemu"}


class Scripted(ThreadingHTTPServer):
    """Answers each request with the next (status, headers, body, delay) of its script."""

    def __init__(self, script: list[tuple[int, dict[str, str], object, float]], port: int = 0):
        self.script = list(script)
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", port), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Scripted

    def _answer(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        status, headers, body, delay = self.server.script.pop(0)
        time.sleep(delay)
        if status == HANG_UP:
            self.close_connection = True
            return
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"content-type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def serving(server: Scripted) -> Iterator[Scripted]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: A "status" for closing the connection without an answer.
HANG_UP = 0
DISCONNECTED = (HANG_UP, {}, None, 0.0)
UNAVAILABLE = (503, {"retry-after": "0"}, {"error": "engine restarting"}, 0.0)
OK = (200, {}, HEALTH, 0.0)


def test_idempotent_call_is_retried_on_503() -> None:
    for server in serving(Scripted([UNAVAILABLE, UNAVAILABLE, OK])):
        with Kiln(server.url, "k") as k:
            assert k.health().status == "ok"
        assert server.seen == ["GET /health"] * 3


def test_retries_run_out_and_the_503_is_raised() -> None:
    for server in serving(Scripted([UNAVAILABLE] * 3)):
        with Kiln(server.url, "k", retries=2) as k, pytest.raises(Unavailable) as info:
            k.health()
        assert info.value.status_code == 503
        assert info.value.message == "engine restarting"
        assert len(server.seen) == 3


def test_a_dropped_connection_is_retried_for_idempotent_calls_only() -> None:
    for server in serving(Scripted([DISCONNECTED, OK, DISCONNECTED])):
        with Kiln(server.url, "k") as k:
            assert k.health().status == "ok"
            with pytest.raises(ConnectionError):
                k.sandboxes.create(name="once")
        assert server.seen == ["GET /health", "GET /health", "POST /sandboxes"]


def test_a_create_is_never_sent_twice() -> None:
    for server in serving(Scripted([UNAVAILABLE])):
        with Kiln(server.url, "k") as k, pytest.raises(Unavailable):
            k.sandboxes.create(name="once")
        assert server.seen == ["POST /sandboxes"]


def test_refused_connection_is_retried_until_the_daemon_is_up() -> None:
    port = free_port()
    server = Scripted([OK], port=port)  # bound now, listening only later
    server.socket.close()

    def start_late() -> None:
        time.sleep(0.3)
        late.append(Scripted([OK], port=port))
        threading.Thread(target=late[0].serve_forever, daemon=True).start()

    late: list[Scripted] = []
    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        with Kiln(f"http://127.0.0.1:{port}", "k", retries=6) as k:
            assert k.health().status == "ok"
    finally:
        starter.join()
        for s in late:
            s.shutdown()
            s.server_close()


def test_a_dead_daemon_still_fails_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with Kiln(url, "k") as k, pytest.raises(ConnectionError, match="cannot reach"):
        k.health()
    assert time.monotonic() - start < 5  # three short backoffs, not a hang
    with Kiln(url, "k", retries=0) as k, pytest.raises(ConnectionError):
        k.health()


def test_with_options_sets_a_timeout_for_every_call_and_shares_the_pool() -> None:
    slow = (200, {}, HEALTH, 1.0)
    for server in serving(Scripted([slow, slow])):
        with Kiln(server.url, "k") as k:
            quick = k.with_options(timeout=0.2, retries=0)
            with pytest.raises(Timeout):
                quick.health()
            quick.close()  # a view: the client's connections stay open
            assert k.health().status == "ok"
            assert quick._http is k._http


def test_with_options_async() -> None:
    async def main() -> None:
        for server in serving(Scripted([UNAVAILABLE, OK, UNAVAILABLE])):
            async with AsyncKiln(server.url, "k") as k:
                assert (await k.health()).status == "ok"
                with pytest.raises(Unavailable):
                    await k.with_options(retries=0).health()

    asyncio.run(main())


def test_negative_retries_are_refused() -> None:
    with Kiln("http://127.0.0.1:9", "k") as k, pytest.raises(ValueError, match="retries"):
        k.with_options(retries=-1)
