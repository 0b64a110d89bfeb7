"""Published ports over real HTTP: rules, URLs, and traffic by Host header without a key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import pytest

from .conftest import ApiUser
from .harness import LiveServer
from .upstream import Upstream


def daemon_port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def public_get(
    server: LiveServer, alias: str, path: str = "/echo/pub", **kw: object
) -> httpx.Response:
    """A browser's request to ``http://<alias>.localhost:<port>/``: no key at all.

    Sent to 127.0.0.1 with the Host header set (what ``*.localhost`` resolves to
    in a browser; the test host's resolver need not know it)."""
    host = f"{alias}.localhost:{daemon_port(server)}"
    return httpx.get(f"{server.url}{path}", headers={"Host": host}, timeout=30, **kw)  # type: ignore[arg-type]


def test_publish_and_serve_without_a_key(
    server: LiveServer, api: ApiUser, upstream: Upstream
) -> None:
    sb = api.sandbox(name="My_App.v2")
    r = api.http.post("/sandboxes/My_App.v2/publish", json={"port": upstream.port})
    assert r.status_code == 201, r.text
    rule = r.json()
    assert set(rule) == {"id", "sandbox_id", "port", "alias", "url", "created_at"}
    assert rule["sandbox_id"] == sb["id"]
    assert rule["port"] == upstream.port
    assert rule["alias"] == f"my-app-v2-{upstream.port}"
    assert rule["url"] == f"http://{rule['alias']}.localhost:{daemon_port(server)}/"
    assert api.http.get("/sandboxes/My_App.v2/publish").json() == [rule]

    r = public_get(server, rule["alias"], "/echo/x?y=1")
    assert r.status_code == 200, r.text
    data = r.json()
    assert (data["raw_path"], data["query"]) == ("/echo/x", "y=1")
    headers = dict(data["headers"])
    assert headers["host"] == f"{rule['alias']}.localhost:{daemon_port(server)}"
    assert "x-forwarded-prefix" not in headers  # served at the root
    # Host matching ignores case, as DNS does.
    assert public_get(server, rule["alias"].upper()).status_code == 200


def test_chosen_alias_and_its_rules(
    server: LiveServer, make_user: Callable[..., ApiUser], upstream: Upstream
) -> None:
    alice, bob = make_user(), make_user()
    alice.sandbox(name="a")
    bob.sandbox(name="b")
    r = alice.http.post("/sandboxes/a/publish", json={"port": upstream.port, "alias": "demo"})
    assert r.status_code == 201, r.text
    assert r.json()["url"].startswith("http://demo.localhost:")
    assert public_get(server, "demo").status_code == 200
    # One alias, one port, globally; one rule per port.
    r = bob.http.post("/sandboxes/b/publish", json={"port": upstream.port, "alias": "demo"})
    assert r.status_code == 409
    assert "demo" in r.json()["error"]
    r = alice.http.post("/sandboxes/a/publish", json={"port": upstream.port, "alias": "other"})
    assert r.status_code == 409
    # Others cannot see or remove the rule.
    assert bob.http.get("/sandboxes/a/publish").status_code == 404
    assert bob.http.delete(f"/sandboxes/a/publish/{upstream.port}").status_code == 404
    # A default alias taken by someone else gets a suffix instead of a 409.
    alice.http.post("/sandboxes/a/publish", json={"port": 4000, "alias": "b-4000"})
    r = bob.http.post("/sandboxes/b/publish", json={"port": 4000})
    assert r.status_code == 201
    assert r.json()["alias"].startswith("b-4000-")


@pytest.mark.parametrize(
    "body",
    [
        {"port": 0},
        {"port": 65536},
        {"port": "3000"},
        {"port": 3000, "alias": "Upper"},
        {"port": 3000, "alias": "has.dot"},
        {"port": 3000, "alias": "-dash"},
        {"port": 3000, "alias": "x" * 64},
        {"port": 3000, "alis": "typo"},
        {},
    ],
)
def test_invalid_publish_is_422(api: ApiUser, body: dict[str, object]) -> None:
    api.sandbox(name="v")
    r = api.http.post("/sandboxes/v/publish", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]


def test_unknown_sandbox_and_rule(api: ApiUser) -> None:
    assert api.http.post("/sandboxes/nope/publish", json={"port": 1}).status_code == 404
    assert api.http.get("/sandboxes/nope/publish").status_code == 404
    api.sandbox(name="u")
    assert api.http.delete("/sandboxes/u/publish/3000").status_code == 404
    assert api.http.delete("/sandboxes/u/publish/abc").status_code == 404


def test_unpublish_and_delete_remove_the_rule(
    server: LiveServer, api: ApiUser, upstream: Upstream
) -> None:
    api.sandbox(name="gone")
    api.http.post("/sandboxes/gone/publish", json={"port": upstream.port, "alias": "gone"})
    assert public_get(server, "gone").status_code == 200
    assert api.http.delete(f"/sandboxes/gone/publish/{upstream.port}").status_code == 204
    r = public_get(server, "gone")
    assert r.status_code == 404
    assert r.json() == {"error": "nothing is published as 'gone'"}

    api.http.post("/sandboxes/gone/publish", json={"port": upstream.port, "alias": "gone"})
    assert api.http.delete("/sandboxes/gone").status_code == 204
    assert public_get(server, "gone").status_code == 404
    # ... and the alias is free again.
    api.sandbox(name="again")
    r = api.http.post("/sandboxes/again/publish", json={"port": upstream.port, "alias": "gone"})
    assert r.status_code == 201


def test_api_hosts_are_not_published_hosts(server: LiveServer, api: ApiUser) -> None:
    """The publish domain itself, IPs and deeper names stay the API."""
    port = daemon_port(server)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"a.b.localhost:{port}"):
        r = api.http.get("/sandboxes", headers={"Host": host})
        assert r.status_code == 200, host


def test_published_port_of_nothing_listening_is_502(server: LiveServer, api: ApiUser) -> None:
    api.sandbox(name="idle")
    api.http.post("/sandboxes/idle/publish", json={"port": 1, "alias": "idle"})
    r = public_get(server, "idle")
    assert r.status_code == 502
    assert "nothing is listening on port 1" in r.json()["error"]


def test_ports_listing_carries_the_published_url(
    server: LiveServer, api: ApiUser, upstream: Upstream
) -> None:
    api.sandbox(name="listed")
    url = api.http.post(
        "/sandboxes/listed/publish", json={"port": upstream.port, "alias": "listed"}
    ).json()["url"]
    entry = next(
        p for p in api.http.get("/sandboxes/listed/ports").json() if p["port"] == upstream.port
    )
    assert entry["published_url"] == url
    entry = next(
        p
        for p in api.http.get("/ports").json()
        if p["port"] == upstream.port and p["sandbox_name"] == "listed"
    )
    assert entry["published_url"] == url
    others = [
        p for p in api.http.get("/sandboxes/listed/ports").json() if p["port"] != upstream.port
    ]
    assert all(p["published_url"] is None for p in others)


def test_stopped_sandbox_wakes_once_for_concurrent_requests(
    server: LiveServer, api: ApiUser, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    sb = api.sandbox(name="sleepy")
    api.http.post("/sandboxes/sleepy/publish", json={"port": upstream.port, "alias": "sleepy"})
    assert api.http.post("/sandboxes/sleepy/stop").status_code == 200
    host = f"sleepy.localhost:{daemon_port(server)}"

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            rs = await asyncio.gather(
                *(client.get(f"/echo/{i}", headers={"Host": host}) for i in range(20))
            )
        return [r.status_code for r in rs]

    with caplog.at_level(logging.INFO, logger="kiln.server"):
        assert asyncio.run(burst()) == [200] * 20
    wakes = [r for r in caplog.records if r.getMessage().startswith(f"sandbox {sb['id']} woken")]
    assert len(wakes) == 1, [r.getMessage() for r in wakes]
    assert api.http.get("/sandboxes/sleepy").json()["status"] == "running"
