"""The proxy and published ports on real microVMs: services run inside the guest.

Inside the VM: ``python3 -m http.server`` (HTTP/1.0, close-delimited) and
:mod:`.guest_web` (HTTP/1.1 with keep-alive, chunked uploads and SSE, and a
WebSocket echo from the host's ``websockets`` package copied into the guest).
Clients are httpx and the websockets client, as a user's would be.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.sync.client import connect

from ..harness import LiveServer
from .conftest import vm_marks

pytestmark = [pytest.mark.vm, pytest.mark.netns, *vm_marks]

APP_PORT, WS_PORT, STATIC_PORT = 8000, 8765, 8001


def _websockets_tar() -> bytes:
    """The host's pure-Python ``websockets`` package, for the guest's python3."""
    root = Path(websockets.__file__).parent
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(root.rglob("*.py")):
            tar.add(path, arcname=f"websockets/{path.relative_to(root)}")
    return buf.getvalue()


def _wait_for(vm: httpx.Client, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = vm.get(url)
        if r.status_code != 502:
            return
        assert time.monotonic() < deadline, f"{url}: {r.text}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def site(vm_server: LiveServer) -> Iterator[str]:
    """A sandbox ``site`` running both services; yields its name."""
    key: str = vm_server.key  # type: ignore[attr-defined]
    with httpx.Client(
        base_url=vm_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
    ) as vm:
        assert vm.post("/sandboxes", json={"name": "site"}).status_code == 201
        app = (Path(__file__).parent / "guest_web.py").read_bytes()
        assert vm.put("/sandboxes/site/files?path=/workspace/app/web.py", content=app).is_success
        r = vm.put("/sandboxes/site/files?path=/workspace/app/ws.tgz", content=_websockets_tar())
        assert r.is_success
        page = b"<h1>hello from the guest</h1>\n"
        assert vm.put(
            "/sandboxes/site/files?path=/workspace/www/index.html", content=page
        ).is_success
        out = vm.post(
            "/sandboxes/site/exec", json={"cmd": ["tar", "-xzf", "ws.tgz"], "cwd": "/workspace/app"}
        )
        assert out.json()["exit_code"] == 0, out.text
        for cmd, cwd in (
            (["python3", "web.py", str(APP_PORT), str(WS_PORT)], "/workspace/app"),
            (["python3", "-m", "http.server", str(STATIC_PORT)], "/workspace/www"),
        ):
            r = vm.post("/sandboxes/site/processes", json={"cmd": cmd, "cwd": cwd})
            assert r.status_code == 201, r.text
        _wait_for(vm, f"/sandboxes/site/proxy/{APP_PORT}/echo")
        _wait_for(vm, f"/sandboxes/site/proxy/{STATIC_PORT}/")
        yield "site"


def test_http_through_the_proxy(vm: httpx.Client, site: str) -> None:
    base = f"/sandboxes/{site}/proxy"
    r = vm.get(f"{base}/{STATIC_PORT}/")
    assert r.status_code == 200
    assert r.text == "<h1>hello from the guest</h1>\n"

    r = vm.get(f"{base}/{APP_PORT}/echo/a%20b?x=1", headers={"X-Custom": "yes"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["path"] == "/echo/a%20b?x=1"
    headers = {k.lower(): v for k, v in data["headers"].items()}
    assert headers["x-custom"] == "yes"
    assert headers["x-forwarded-prefix"] == f"{base}/{APP_PORT}"
    assert headers["x-forwarded-proto"] == "http"
    assert "authorization" not in headers

    r = vm.get(f"{base}/{APP_PORT}/redirect")
    assert (r.status_code, r.headers["location"]) == (302, f"{base}/{APP_PORT}/login")


def test_streaming_both_ways(vm: httpx.Client, site: str) -> None:
    base = f"/sandboxes/{site}/proxy/{APP_PORT}"
    payload = os.urandom(10 << 20)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 1 << 16):
            yield payload[i : i + (1 << 16)]

    r = vm.post(f"{base}/upload", content=chunks())
    assert r.status_code == 200, r.text
    assert r.json() == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}

    vm.post(f"/sandboxes/{site}/exec", json={"cmd": ["rm", "-f", "/tmp/release"]})
    with vm.stream("GET", f"{base}/sse") as r:
        lines = r.iter_lines()
        assert next(lines) == "data: event 0"
        # The service holds events 1 and 2 until told: event 0 came through alone.
        vm.post(f"/sandboxes/{site}/exec", json={"cmd": ["touch", "/tmp/release"]})
        rest = [line for line in lines if line]
    assert rest == ["data: event 1", "data: event 2"]


def test_websocket_echo(vm_server: LiveServer, site: str) -> None:
    key: str = vm_server.key  # type: ignore[attr-defined]
    host = vm_server.url.removeprefix("http://")
    url = f"ws://{host}/sandboxes/{site}/proxy/{WS_PORT}/?token={key}"
    with connect(url, subprotocols=["chat"], max_size=None) as ws:
        assert ws.subprotocol == "chat"
        ws.send("hello vm")
        assert ws.recv() == "hello vm"
        blob = os.urandom(1 << 20)
        ws.send(blob)
        assert ws.recv() == blob


def test_errors(vm: httpx.Client, site: str) -> None:
    r = vm.get(f"/sandboxes/{site}/proxy/9/")
    assert r.status_code == 502
    assert "nothing is listening on port 9" in r.json()["error"]
    assert vm.get(f"/sandboxes/{site}/proxy/x/").status_code == 400
    assert vm.get(f"/sandboxes/nope/proxy/{APP_PORT}/").status_code == 404


def test_published_port_wakes_a_cold_vm_once(
    vm: httpx.Client, vm_server: LiveServer, site: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = vm.post(f"/sandboxes/{site}/publish", json={"port": APP_PORT, "alias": "siteapp"})
    assert r.status_code == 201, r.text
    port = int(vm_server.url.rsplit(":", 1)[1])
    assert r.json()["url"] == f"http://siteapp.localhost:{port}/"
    host = {"Host": f"siteapp.localhost:{port}"}
    with httpx.Client(base_url=vm_server.url, timeout=300) as anon:  # no key at all
        r = anon.get("/echo/public", headers=host)
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/echo/public"

        r = vm.post(f"/sandboxes/{site}/stop")
        assert r.json()["thermal"] == "cold"
        sb_id = r.json()["id"]

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=vm_server.url, timeout=300) as client:
                rs = await asyncio.gather(
                    *(client.get(f"/echo/{i}", headers=host) for i in range(20))
                )
            return [r.status_code for r in rs]

        with caplog.at_level(logging.INFO, logger="kiln.server"):
            assert asyncio.run(burst()) == [200] * 20
        wakes = [
            r.getMessage() for r in caplog.records if f"sandbox {sb_id} woken" in r.getMessage()
        ]
        assert len(wakes) == 1, wakes
        assert vm.get(f"/sandboxes/{site}").json()["thermal"] == "hot"

        assert vm.delete(f"/sandboxes/{site}/publish/{APP_PORT}").status_code == 204
        r = anon.get("/echo/public", headers=host)
        assert r.status_code == 404
