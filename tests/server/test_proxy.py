"""The reverse proxy over real HTTP: daemon → real test-mode agent → a real web service.

The service (:mod:`.upstream`, uvicorn) listens on loopback, which is "inside
the sandbox" for a test-mode agent. Requests go through httpx and the
``websockets`` client, as a user's would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as asyncio_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from .conftest import ApiUser
from .harness import LiveServer
from .upstream import Upstream


@pytest.fixture
def web(api: ApiUser) -> str:
    api.sandbox(name="web")
    return "web"


def proxy(upstream: Upstream, sandbox: str = "web") -> str:
    return f"/sandboxes/{sandbox}/proxy/{upstream.port}"


def echo(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def headers_of(data: dict[str, Any]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for key, value in data["headers"]:
        seen.setdefault(key, []).append(value)
    return seen


# --- plain HTTP ------------------------------------------------------------------------


def test_get_keeps_path_and_query(api: ApiUser, web: str, upstream: Upstream) -> None:
    data = echo(api.http.get(f"{proxy(upstream)}/echo/a%20b/c?x=1&y=%2F&x=2"))
    assert data["method"] == "GET"
    assert data["raw_path"] == "/echo/a%20b/c"
    assert data["query"] == "x=1&y=%2F&x=2"


def test_root_without_slash_redirects_to_it(api: ApiUser, web: str, upstream: Upstream) -> None:
    r = api.http.get(f"{proxy(upstream)}?q=1")
    assert r.status_code == 308
    assert r.headers["location"] == f"{proxy(upstream)}/?q=1"


def test_by_id_and_by_name(api: ApiUser, upstream: Upstream) -> None:
    sb = api.sandbox(name="named")
    by_id = echo(api.http.get(f"{proxy(upstream, str(sb['id']))}/echo"))
    assert headers_of(by_id)["x-forwarded-prefix"] == [
        f"/sandboxes/{sb['id']}/proxy/{upstream.port}"
    ]
    echo(api.http.get(f"{proxy(upstream, 'named')}/echo"))


def test_header_forwarding(api: ApiUser, web: str, upstream: Upstream) -> None:
    r = api.http.get(
        f"{proxy(upstream)}/echo",
        headers={
            "X-Custom": "kept",
            "Cookie": "a=1",
            "X-Forwarded-For": "10.9.9.9",
            "X-Forwarded-Host": "evil.example",
            # Hop-by-hop: this connection's business only.
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        },
    )
    data = echo(r)
    seen = headers_of(data)
    assert seen["x-custom"] == ["kept"]
    assert seen["cookie"] == ["a=1"]
    for hop in ("x-hop", "te", "proxy-authorization", "keep-alive"):
        assert hop not in seen, hop
    # The daemon's API key never reaches the sandbox.
    assert "authorization" not in seen
    host = api.http.base_url.netloc.decode()
    assert seen["host"] == [host]
    assert seen["x-forwarded-host"] == [host]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-for"] == ["10.9.9.9, 127.0.0.1"]
    assert seen["x-forwarded-prefix"] == [proxy(upstream)]
    # Response headers come back, minus the service's hop-by-hop ones.
    assert r.headers["x-upstream"] == "yes"
    assert "x-secret" not in r.headers
    assert r.headers.get_list("date") and len(r.headers.get_list("date")) == 1


def test_key_in_the_url_is_refused_for_plain_http(
    api: ApiUser, web: str, upstream: Upstream
) -> None:
    """``?token=`` is for WebSockets: in a page's URL the key would travel on to the
    sandbox in Referer headers and be readable by the page's scripts."""
    url = f"{api.http.base_url}{proxy(upstream)}/echo?token={api.key}"
    r = httpx.get(url)
    assert r.status_code == 401
    assert api.key not in r.text


def test_query_is_relayed_byte_for_byte(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    data = echo(api.http.get(f"{proxy(upstream)}/echo?a=x%20y&flag&b=%E9&token=other"))
    assert data["query"] == "a=x%20y&flag&b=%E9&token=other"  # not the daemon's key: kept


def test_daemon_keys_never_reach_a_published_app(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    api.http.post("/sandboxes/web/publish", json={"port": upstream.port, "alias": "keys"})
    host = f"keys.localhost:{server.url.rsplit(':', 1)[1]}"
    # An app's own credentials pass ...
    r = httpx.get(f"{server.url}/echo", headers={"Host": host, "Authorization": "Bearer app"})
    assert headers_of(echo(r))["authorization"] == ["Bearer app"]
    # ... a daemon key (a user who has the API open, or anyone's) does not.
    r = httpx.get(
        f"{server.url}/echo", headers={"Host": host, "Authorization": f"Bearer {api.key}"}
    )
    assert "authorization" not in headers_of(echo(r))


def test_post_streams_a_10_mb_body(api: ApiUser, web: str, upstream: Upstream) -> None:
    payload = os.urandom(10 << 20)

    def chunks() -> Iterator[bytes]:  # no length given: sent chunked
        for i in range(0, len(payload), 1 << 16):
            yield payload[i : i + (1 << 16)]

    r = api.http.post(f"{proxy(upstream)}/upload", content=chunks())
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == hashlib.sha256(payload).hexdigest()
    assert r.json()["size"] == len(payload)
    # With a Content-Length the body streams too (above the API's 4 MiB JSON limit).
    r = api.http.put(f"{proxy(upstream)}/upload", content=payload)
    assert r.json()["size"] == len(payload)


def test_download_streams(api: ApiUser, web: str, upstream: Upstream) -> None:
    digest, size = hashlib.sha256(), 0
    with api.http.stream("GET", f"{proxy(upstream)}/big?mb=20") as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(20 << 20)
        for chunk in r.iter_raw():
            digest.update(chunk)
            size += len(chunk)
    assert size == 20 << 20
    assert digest.hexdigest() == hashlib.sha256(b"k" * (20 << 20)).hexdigest()


def test_server_sent_events_arrive_as_sent(api: ApiUser, web: str, upstream: Upstream) -> None:
    upstream.release.clear()
    upstream.sse_done.clear()
    with api.http.stream("GET", f"{proxy(upstream)}/sse?n=3") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "id: 0"
        assert next(lines) == "data: event 0"
        # Event 0 is here while the service still holds the stream open.
        assert not upstream.sse_done.is_set()
        upstream.release.set()
        rest = [line for line in lines if line]
    assert rest == ["id: 1", "data: event 1", "id: 2", "data: event 2"]


def test_redirects_are_rewritten_under_the_prefix(
    api: ApiUser, web: str, upstream: Upstream
) -> None:
    base = proxy(upstream)
    host = api.http.base_url.netloc.decode()
    cases = {
        "/login": f"{base}/login",
        f"http://localhost:{upstream.port}/x?y=1": f"http://{host}{base}/x?y=1",
        f"http://127.0.0.1:{upstream.port}/": f"http://{host}{base}/",
        f"{base}/already": f"{base}/already",  # an app that honours X-Forwarded-Prefix
        "relative/page": "relative/page",
        "https://example.com/away": "https://example.com/away",
        "http://localhost:1/other-port": "http://localhost:1/other-port",
    }
    for location, expected in cases.items():
        r = api.http.get(f"{base}/redirect", params={"to": location})
        assert r.status_code == 302
        assert r.headers["location"] == expected, location


def test_connections_are_reused(api: ApiUser, web: str, upstream: Upstream) -> None:
    peers = {tuple(echo(api.http.get(f"{proxy(upstream)}/echo"))["peer"]) for _ in range(5)}
    # The agent's side of one pooled connection: the same source port each time.
    assert len(peers) == 1, peers


# --- errors ----------------------------------------------------------------------------


def test_nothing_listening_is_502(api: ApiUser, web: str) -> None:
    r = api.http.get("/sandboxes/web/proxy/1/")
    assert r.status_code == 502
    assert "nothing is listening on port 1" in r.json()["error"]


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-1", "3.5", ""])
def test_bad_port_is_400(api: ApiUser, web: str, port: str) -> None:
    r = api.http.get(f"/sandboxes/web/proxy/{port}/")
    assert r.status_code == 400, r.text
    assert "invalid port" in r.json()["error"]


def test_unknown_sandbox_is_404(api: ApiUser, upstream: Upstream) -> None:
    for ref in ("nope", "sb-000000000000", "%00"):
        r = api.http.get(f"/sandboxes/{ref}/proxy/{upstream.port}/")
        assert r.status_code == 404, r.text
        assert "not found" in r.json()["error"]


def test_needs_the_owners_key(
    make_user: Callable[..., ApiUser], anon: httpx.Client, upstream: Upstream
) -> None:
    owner, other = make_user(), make_user()
    owner.sandbox(name="mine")
    path = f"{proxy(upstream, 'mine')}/echo"
    assert anon.get(path).status_code == 401
    assert anon.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = other.http.get(path)
    assert r.status_code == 404  # not "forbidden": others' sandboxes do not exist for you
    assert owner.http.get(path).status_code == 200


def test_service_that_hangs_up_is_502(api: ApiUser, web: str) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def hang_up() -> None:
            conn, _ = srv.accept()
            conn.recv(1024)
            conn.close()

        t = threading.Thread(target=hang_up)
        t.start()
        r = api.http.get(f"/sandboxes/web/proxy/{port}/")
        t.join(10)
    assert r.status_code == 502
    assert "failed to answer" in r.json()["error"]


# --- WebSocket -------------------------------------------------------------------------


def ws_url(server: LiveServer, path: str, key: str) -> str:
    return f"ws://{server.url.removeprefix('http://')}{path}?token={key}"


def test_websocket_echo(server: LiveServer, api: ApiUser, web: str, upstream: Upstream) -> None:
    url = ws_url(server, f"{proxy(upstream)}/ws", api.key)
    with connect(url, subprotocols=["chat"], max_size=None) as ws:
        assert ws.subprotocol == "chat"
        hello = json.loads(ws.recv())
        assert hello["path"] == "/ws"
        assert "token=" not in json.dumps(hello)  # the key stays outside
        assert hello["hello"]["x-forwarded-prefix"] == proxy(upstream)
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send(b"\x00\xff" * 10)
        assert ws.recv() == b"\x00\xff" * 10
        big = os.urandom(3 << 20)
        ws.send(big)
        assert ws.recv() == big
        ws.send(["frag", "mented"])  # a fragmented message arrives whole
        assert ws.recv() == "fragmented"


def test_websocket_close_code_is_relayed(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    with connect(ws_url(server, f"{proxy(upstream)}/ws", api.key)) as ws:
        ws.recv()
        ws.send("close-me")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "asked to")


def test_websocket_refusal_is_relayed(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    with pytest.raises(InvalidStatus) as info:
        connect(ws_url(server, f"{proxy(upstream)}/ws-deny", api.key)).close()
    assert info.value.response.status_code == 403
    assert json.loads(info.value.response.body) == {"error": "go away"}


def test_websocket_errors(server: LiveServer, api: ApiUser, web: str, upstream: Upstream) -> None:
    for path, key, status in (
        ("/sandboxes/web/proxy/1/ws", api.key, 502),
        ("/sandboxes/web/proxy/x/ws", api.key, 400),
        (f"/sandboxes/nope/proxy/{upstream.port}/ws", api.key, 404),
        (f"{proxy(upstream)}/ws", "wrong", 401),
    ):
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url(server, path, key)).close()
        assert info.value.response.status_code == status, path
        assert "error" in json.loads(info.value.response.body)


# --- waking and activity -----------------------------------------------------------------


def test_proxy_wakes_a_stopped_sandbox(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    assert api.http.post("/sandboxes/web/stop").status_code == 200
    assert api.http.get("/sandboxes/web").json()["status"] == "stopped"
    echo(api.http.get(f"{proxy(upstream)}/echo"))
    assert api.http.get("/sandboxes/web").json()["status"] == "running"


def test_a_request_counts_as_activity(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    sb_id = api.http.get("/sandboxes/web").json()["id"]
    before = server.thermal.last_touch(sb_id) or 0.0
    echo(api.http.get(f"{proxy(upstream)}/echo"))
    after = server.thermal.last_touch(sb_id)
    assert after is not None and after > before


def test_stop_drops_pooled_connections(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    first = echo(api.http.get(f"{proxy(upstream)}/echo"))["peer"]
    assert echo(api.http.get(f"{proxy(upstream)}/echo"))["peer"] == first
    api.http.post("/sandboxes/web/stop")
    assert echo(api.http.get(f"{proxy(upstream)}/echo"))["peer"] != first


def test_concurrent_requests(api: ApiUser, web: str, upstream: Upstream) -> None:
    async def main() -> list[int]:
        async with httpx.AsyncClient(
            base_url=str(api.http.base_url), headers=dict(api.http.headers), timeout=60
        ) as client:
            rs = await asyncio.gather(
                *(client.get(f"{proxy(upstream)}/echo/{i}") for i in range(100))
            )
        return [r.status_code for r in rs]

    assert asyncio.run(main()) == [200] * 100


# --- review regressions ----------------------------------------------------------------


def test_client_leaving_before_the_answer_ends_the_upstream_request(
    api: ApiUser, web: str, upstream: Upstream
) -> None:
    upstream.hold_gone.clear()
    with pytest.raises(httpx.ReadTimeout):
        api.http.get(f"{proxy(upstream)}/hold", timeout=0.5)
    assert upstream.hold_gone.wait(10)


def test_bodyless_answers_drop_their_content_length(
    api: ApiUser, web: str, upstream: Upstream
) -> None:
    for code in (204, 304):
        r = api.http.get(f"{proxy(upstream)}/status", params={"code": code, "length": 10})
        assert r.status_code == code
        assert r.content == b""


def test_cookies_stay_with_their_app(api: ApiUser, web: str, upstream: Upstream) -> None:
    cookies = "a=1; Path=/; Domain=localhost; HttpOnly|b=2|c=3; path=/app"
    r = api.http.get(f"{proxy(upstream)}/status", params={"cookies": cookies})
    assert r.headers.get_list("set-cookie") == [
        f"a=1; Path={proxy(upstream)}/; HttpOnly",
        f"b=2; Path={proxy(upstream)}/",
        f"c=3; Path={proxy(upstream)}/app",
    ]


def test_redirect_to_the_host_it_was_sent_gets_the_prefix(
    api: ApiUser, web: str, upstream: Upstream
) -> None:
    host = api.http.base_url.netloc.decode()
    r = api.http.get(f"{proxy(upstream)}/redirect", params={"to": f"http://{host}/items/"})
    assert r.headers["location"] == f"http://{host}{proxy(upstream)}/items/"


@pytest.mark.parametrize("port", ["%C2%B2", "%D9%A3%D9%A0", "00000003000"])
def test_non_ascii_or_long_ports_are_400(api: ApiUser, web: str, port: str) -> None:
    assert api.http.get(f"/sandboxes/web/proxy/{port}/").status_code == 400
    assert api.http.delete(f"/sandboxes/web/publish/{port}").status_code == 404


def test_credentials_are_checked_before_the_port(anon: httpx.Client) -> None:
    assert anon.get("/sandboxes/web/proxy/x/").status_code == 401


def test_connection_header_cannot_remove_host(api: ApiUser, web: str, upstream: Upstream) -> None:
    r = api.http.get(f"{proxy(upstream)}/echo", headers={"Connection": "host, content-length"})
    assert headers_of(echo(r))["host"] == [api.http.base_url.netloc.decode()]


def test_websocket_under_load_both_ways(
    server: LiveServer, api: ApiUser, web: str, upstream: Upstream
) -> None:
    """The service writes back while we keep writing: neither side may wait on the other.

    The asyncio client, because the sync one holds its protocol lock while blocked in
    ``sendall``, so its own reader stalls and the test would measure the client.
    """
    blob = os.urandom(1 << 20)
    url = ws_url(server, f"{proxy(upstream)}/ws", api.key)

    async def both_ways() -> list[int]:
        async with asyncio_connect(url, max_size=None) as ws:
            await ws.recv()  # hello

            async def reader() -> list[int]:
                return [len(await ws.recv()) for _ in range(40)]

            reading = asyncio.create_task(reader())
            for _ in range(40):
                await ws.send(blob)
            async with asyncio.timeout(60):
                return await reading

    assert asyncio.run(both_ways()) == [1 << 20] * 40
