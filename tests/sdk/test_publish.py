"""Proxy URLs and published ports through the SDK, against a real daemon.

A test-mode agent shares the test's network, so the real web service of
``tests/server/upstream.py`` on a loopback port is "inside the sandbox" for the
daemon's relay. A published port is reached the way a browser reaches
``http://<alias>.localhost:<port>/``: a connection to the daemon's address with
that ``Host``, and no API key.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.sync.client import connect

from kiln.sdk import AsyncKiln, Conflict, Kiln, NotFound, Port, Sandbox, ValidationError
from server.upstream import Upstream

from .conftest import Daemon, unique


def test_publish_returns_the_alias_url_and_it_needs_no_key(
    daemon: Daemon, sb: Sandbox, upstream: Upstream
) -> None:
    url = sb.publish(upstream.port)

    parts = urlsplit(url)
    daemon_port = urlsplit(daemon.url).port
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == (
        "http",
        f"{sb.name}-{upstream.port}.localhost",
        daemon_port,
        "/",
    )
    resp = daemon.visit(url, "/echo/hi?q=1")
    assert resp.status_code == 200, resp.text
    seen = resp.json()
    assert (seen["method"], seen["raw_path"], seen["query"]) == ("GET", "/echo/hi", "q=1")
    assert "authorization" not in dict(seen["headers"])

    [rule] = sb.published()
    assert (rule.port, rule.alias, rule.url, rule.sandbox_id) == (
        upstream.port,
        f"{sb.name}-{upstream.port}",
        url,
        sb.id,
    )


def test_an_explicit_alias(daemon: Daemon, sb: Sandbox, upstream: Upstream) -> None:
    alias = unique("app")
    url = sb.publish(upstream.port, alias=alias)
    assert urlsplit(url).hostname == f"{alias}.localhost"
    assert daemon.visit(url, "/echo/a").json()["raw_path"] == "/echo/a"


def test_url_is_the_proxy_path_and_needs_the_key(
    daemon: Daemon, kiln: Kiln, sb: Sandbox, upstream: Upstream
) -> None:
    url = sb.url(upstream.port)
    assert url == f"{daemon.url}/sandboxes/{sb.id}/proxy/{upstream.port}/"
    # A ref addresses the sandbox by what it was given, here its name.
    by_name = kiln.sandboxes.ref(sb.name).url(upstream.port)
    assert by_name == f"{daemon.url}/sandboxes/{sb.name}/proxy/{upstream.port}/"

    for target in (url, by_name):
        with httpx.Client(headers={"Authorization": f"Bearer {daemon.token}"}) as keyed:
            resp = keyed.get(target + "echo/x")
        assert resp.status_code == 200, resp.text
        assert resp.json()["raw_path"] == "/echo/x"
        assert "authorization" not in dict(resp.json()["headers"])  # the key stays out
    assert httpx.get(url + "echo/x").status_code == 401
    # A key in the URL is for WebSockets only (in a page's URL it would travel on
    # in Referer headers).
    assert httpx.get(url + f"echo/x?token={daemon.token}").status_code == 401


def test_url_checks_the_port_without_a_request(sb: Sandbox) -> None:
    for bad in (0, 65536, True):
        with pytest.raises(ValueError, match="invalid port"):
            sb.url(bad)


def test_unpublish_makes_the_host_answer_404(
    daemon: Daemon, sb: Sandbox, upstream: Upstream
) -> None:
    url = sb.publish(upstream.port)
    assert daemon.visit(url, "/echo/").status_code == 200

    sb.unpublish(upstream.port)
    resp = daemon.visit(url, "/echo/")
    assert resp.status_code == 404
    assert "nothing is published" in resp.json()["error"]
    assert sb.published() == []
    with pytest.raises(NotFound, match=f"port {upstream.port} is not published"):
        sb.unpublish(upstream.port)


def test_ports_carry_the_published_url(kiln: Kiln, sb: Sandbox, upstream: Upstream) -> None:
    def entry(ports: list[Port]) -> Port:
        [found] = [p for p in ports if p.port == upstream.port and p.sandbox_id == sb.id]
        return found

    before = entry(sb.ports())
    assert before.published_url is None
    assert before.proxy_url == f"/sandboxes/{sb.id}/proxy/{upstream.port}/"

    url = sb.publish(upstream.port)
    mine = entry(sb.ports())
    assert (mine.published_url, mine.sandbox_name) == (url, sb.name)
    everywhere = entry(kiln.ports())
    assert (everywhere.published_url, everywhere.sandbox_name) == (url, sb.name)


def test_publish_conflicts_and_bad_values(kiln: Kiln, sb: Sandbox, upstream: Upstream) -> None:
    alias = unique("taken")
    sb.publish(upstream.port, alias=alias)
    with pytest.raises(Conflict, match=f"port {upstream.port} is already published"):
        sb.publish(upstream.port)
    with kiln.sandboxes.create(name=unique("other")) as other:
        with pytest.raises(Conflict, match="already in use"):
            other.publish(upstream.port, alias=alias)
        # Without an alias the natural one is used, whatever the other sandbox has.
        assert other.publish(upstream.port).startswith(f"http://{other.name}-{upstream.port}.")
    for bad_alias in ("Upper", "under_score", "-dash", "a" * 64):
        with pytest.raises(ValidationError):
            sb.publish(upstream.port + 1, alias=bad_alias)
    with pytest.raises(ValidationError):
        sb.publish(0)
    assert [p.port for p in sb.published()] == [upstream.port]


def test_a_published_websocket(daemon: Daemon, sb: Sandbox, upstream: Upstream) -> None:
    url = sb.publish(upstream.port)
    ws_url = url.replace("http://", "ws://", 1) + "ws"
    daemon_addr = urlsplit(daemon.url)
    # Connect to the daemon's address; the handshake names the published host.
    sock = socket.create_connection((daemon_addr.hostname, daemon_addr.port), timeout=10)
    with connect(ws_url, sock=sock, open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["path"] == "/ws"
        assert hello["hello"]["host"] == urlsplit(url).netloc
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"


def test_a_websocket_through_the_proxy_url(daemon: Daemon, sb: Sandbox, upstream: Upstream) -> None:
    ws_url = sb.url(upstream.port).replace("http://", "ws://", 1) + "ws"
    key = {"Authorization": f"Bearer {daemon.token}"}
    with connect(ws_url, additional_headers=key, open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["path"] == "/ws"
        assert "authorization" not in hello["hello"]
        ws.send(b"\x00bin")
        assert ws.recv(timeout=10) == b"\x00bin"


def test_a_request_to_a_published_url_wakes_a_stopped_sandbox(
    daemon: Daemon, sb: Sandbox, upstream: Upstream
) -> None:
    url = sb.publish(upstream.port)
    assert sb.stop().status == "stopped"
    resp = daemon.visit(url, "/echo/woken")
    assert resp.status_code == 200, resp.text
    assert resp.json()["raw_path"] == "/echo/woken"
    assert sb.refresh().status == "running"


async def test_async_publish_url_and_unpublish(
    akiln: AsyncKiln, daemon: Daemon, upstream: Upstream
) -> None:
    async with await akiln.sandboxes.create(name=unique("async")) as sb:
        assert sb.url(upstream.port) == f"{daemon.url}/sandboxes/{sb.id}/proxy/{upstream.port}/"
        url = await sb.publish(upstream.port, alias=unique("async"))
        [port] = [p for p in await sb.ports() if p.port == upstream.port]
        assert port.published_url == url
        async with httpx.AsyncClient(base_url=daemon.url) as anonymous:
            host = {"Host": urlsplit(url).netloc}
            assert (await anonymous.get("/echo/async", headers=host)).status_code == 200
            assert [p.url for p in await sb.published()] == [url]
            await sb.unpublish(upstream.port)
            assert (await anonymous.get("/echo/async", headers=host)).status_code == 404
