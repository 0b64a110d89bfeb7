"""The E2B control plane over plain HTTP: its error shape and statuses, bad input,
authentication, paging. The app runs for real (uvicorn, SQLite) over a fake engine
of states only: these tests are about the routes, not the machines (the SDK against
real VMs is ``test_control.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.engine import FakeEngine
from kiln.store import Quotas

from ..harness import LiveServer

E2B = "/e2b"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("e2b-http"), engine_factory=lambda _: FakeEngine())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys(live: LiveServer) -> tuple[str, str]:
    _, one = live.store.create_user("one", quotas=Quotas(max_sandboxes=20))
    _, two = live.store.create_user("two")
    return one, two


@pytest.fixture
def c(live: LiveServer, keys: tuple[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url + E2B, headers={"X-API-KEY": keys[0]}) as client:
        yield client


def _error(r: httpx.Response, status: int, match: str = "") -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message"} and body["code"] == status, body
    assert isinstance(body["message"], str) and match in body["message"], body
    return str(body["message"])


def _create(c: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = c.post("/v2/sandboxes", json={"templateID": "base", **fields})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_authentication(live: LiveServer, keys: tuple[str, str]) -> None:
    url = live.url + E2B + "/v2/sandboxes"
    _error(httpx.get(url), 401, "X-API-KEY")
    _error(httpx.get(url, headers={"X-API-KEY": "kiln_nope"}), 401, "invalid API key")
    assert httpx.get(url, headers={"X-API-KEY": keys[0]}).status_code == 200
    # kiln's own header works too.
    assert httpx.get(url, headers={"Authorization": f"Bearer {keys[0]}"}).status_code == 200


def test_create_answers_e2b_s_sandbox(c: httpx.Client, live: LiveServer) -> None:
    body = _create(c, metadata={"k": "v"}, envVars={"A": "1"}, timeout=60)
    assert set(body) == {
        "templateID",
        "alias",
        "sandboxID",
        "clientID",
        "envdVersion",
        "envdAccessToken",
        "trafficAccessToken",
        "domain",
    }
    assert (body["templateID"], body["envdVersion"]) == ("base", "0.5.7")
    sid = body["sandboxID"]
    # The token is the daemon's, per sandbox, and the same in every answer.
    assert live.services.envd_tokens.verify(sid, body["envdAccessToken"])
    assert not live.services.envd_tokens.verify("sb-other", body["envdAccessToken"])
    detail = c.get(f"/sandboxes/{sid}").json()
    assert detail["envdAccessToken"] == body["envdAccessToken"]
    assert detail["metadata"] == {"k": "v"} and detail["state"] == "running"
    connected = c.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 10})
    assert connected.status_code == 200
    assert connected.json()["envdAccessToken"] == body["envdAccessToken"]
    row = live.store.get_sandbox(sid)
    assert (row.config.user, row.config.template, dict(row.config.env)) == (
        "user",
        "base",
        {"A": "1"},
    )
    assert c.delete(f"/sandboxes/{sid}").status_code == 204
    _error(c.delete(f"/sandboxes/{sid}"), 404, sid)


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({}, 422, "templateID: field required"),
        ({"templateID": 5}, 422, "templateID"),
        ({"templateID": "base", "timeout": "60"}, 422, "timeout"),
        ({"templateID": "base", "timeout": 0}, 422, "timeout"),
        ({"templateID": "base", "timeout": 10**12}, 422, "timeout"),
        ({"templateID": "base", "envVars": {"A": 1}}, 422, "envVars"),
        ({"templateID": "base", "metadata": {"k": ["v"]}}, 422, "metadata"),
        ({"templateID": "base", "metadata": {"a=b": "v"}}, 422, "without '='"),
        ({"templateID": "base", "autoPause": "yes"}, 422, "autoPause"),
        ({"templateID": "base", "timeot": 5}, 422, "did you mean 'timeout'"),
        ([1, 2], 422, "object"),
        ({"templateID": "nope"}, 404, "template 'nope' not found"),
        ({"templateID": "base", "mcp": {"x": {}}}, 400, "mcp"),
        ({"templateID": "base", "iam": {"tokens": {"a": {}}}}, 400, "iam"),
        ({"templateID": "base", "autoResume": {"enabled": True}}, 400, "autoResume"),
        ({"templateID": "base", "autoPause": True, "autoPauseMemory": False}, 400, "filesystem"),
        ({"templateID": "base", "network": {"rules": {"a.com": []}}}, 400, "rules"),
        ({"templateID": "base", "network": {"allowOut": ["not a target!"]}}, 422, "network"),
        ({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/"}]}, 422, "mount"),
    ],
)
def test_bad_creates_get_e2b_errors(c: httpx.Client, body: Any, status: int, match: str) -> None:
    message = _error(c.post("/v2/sandboxes", json=body), status, match)
    assert "Traceback" not in message


def test_malformed_json_is_a_400(c: httpx.Client) -> None:
    _error(c.post("/v2/sandboxes", content=b"{nope"), 400, "not valid JSON")


def test_routes_kiln_lacks_say_so(c: httpx.Client) -> None:
    for method, path in [
        ("POST", "/sandboxes/x/fork"),
        ("POST", "/sandboxes/x/snapshots"),
        ("PUT", "/sandboxes/x/network"),
        ("GET", "/v2/sandboxes/x/logs"),
        ("POST", "/v3/templates"),
        ("GET", "/templates/base/tags"),
        ("DELETE", "/volumes/v1"),
        ("GET", "/secrets"),
        ("GET", "/snapshots"),
    ]:
        _error(c.request(method, path, json={}), 400, "not supported by kiln")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sandboxes/sb-nope"),
        ("DELETE", "/sandboxes/sb-nope"),
        ("POST", "/sandboxes/sb-nope/pause"),
        ("POST", "/v2/sandboxes/sb-nope/connect"),
        ("POST", "/sandboxes/sb-nope/connect"),
        ("POST", "/sandboxes/sb-nope/resume"),
        ("GET", "/sandboxes/sb-nope/metrics"),
        ("GET", "/sandboxes/..%2F..%2Fetc"),
    ],
)
def test_unknown_sandboxes_are_404(c: httpx.Client, method: str, path: str) -> None:
    _error(c.request(method, path, json={} if method == "POST" else None), 404)


def test_timeout_of_an_unknown_sandbox_is_404(c: httpx.Client) -> None:
    _error(c.post("/sandboxes/sb-nope/timeout", json={"timeout": 5}), 404)
    _error(c.post("/sandboxes/sb-nope/timeout", json={"timeout": "5"}), 422, "timeout")
    _error(c.post("/sandboxes/sb-nope/timeout", json={}), 422, "timeout")


def test_another_user_s_sandbox_is_404(
    c: httpx.Client, live: LiveServer, keys: tuple[str, str]
) -> None:
    sid = _create(c)["sandboxID"]
    with httpx.Client(base_url=live.url + E2B, headers={"X-API-KEY": keys[1]}) as other:
        _error(other.get(f"/sandboxes/{sid}"), 404)
        _error(other.delete(f"/sandboxes/{sid}"), 404)
        _error(other.post(f"/sandboxes/{sid}/pause", json={}), 404)
        _error(other.post(f"/sandboxes/{sid}/timeout", json={"timeout": 1}), 404)
        _error(other.post(f"/v2/sandboxes/{sid}/connect", json={}), 404)
        assert sid not in {s["sandboxID"] for s in other.get("/v2/sandboxes").json()}
    assert c.get(f"/sandboxes/{sid}").json()["state"] == "running"
    assert c.delete(f"/sandboxes/{sid}").status_code == 204


def test_pause_resume_and_connect_statuses(c: httpx.Client) -> None:
    sid = _create(c, autoPause=True)["sandboxID"]
    _error(c.post(f"/sandboxes/{sid}/resume", json={}), 409, "already running")
    assert c.post(f"/sandboxes/{sid}/pause").status_code == 204
    _error(c.post(f"/sandboxes/{sid}/pause", json={}), 409, "already paused")
    detail = c.get(f"/sandboxes/{sid}").json()
    assert (detail["state"], detail["pauseMode"]) == ("paused", "full")
    assert detail["endAt"] == "9999-01-01T00:00:00Z"  # paused: no timeout until a connect
    assert detail["lifecycle"] == {"autoResume": False, "onTimeout": "pause"}
    _error(c.post(f"/v2/sandboxes/{sid}/connect", json={"memory": False}), 400, "cold boot")
    assert c.post(f"/v2/sandboxes/{sid}/connect", json={}).status_code == 201
    assert c.post(f"/v2/sandboxes/{sid}/connect", json={}).status_code == 200
    assert c.post(f"/sandboxes/{sid}/pause", json={"memory": True}).status_code == 204
    assert c.post(f"/sandboxes/{sid}/resume", json={"timeout": 30}).status_code == 201
    assert c.delete(f"/sandboxes/{sid}").status_code == 204


def test_list_pages_with_a_next_token(c: httpx.Client) -> None:
    ids = [_create(c, metadata={"page": "yes", "n": str(i)})["sandboxID"] for i in range(3)]
    query = {"metadata": "page=yes", "limit": 2}
    first = c.get("/v2/sandboxes", params=query)
    assert [s["sandboxID"] for s in first.json()] == ids[:2]
    token = first.headers["x-next-token"]
    second = c.get("/v2/sandboxes", params={**query, "nextToken": token})
    assert [s["sandboxID"] for s in second.json()] == ids[2:]
    assert "x-next-token" not in second.headers
    desc = c.get("/v2/sandboxes", params={**query, "order": "desc", "limit": 5}).json()
    assert [s["sandboxID"] for s in desc] == ids[::-1]
    # The legacy list: running ones, no paging.
    assert c.post(f"/sandboxes/{ids[0]}/pause").status_code == 204
    legacy = c.get("/sandboxes", params={"metadata": "page=yes"}).json()
    assert [s["sandboxID"] for s in legacy] == ids[1:]
    paused = c.get("/v2/sandboxes", params={"metadata": "page=yes", "state": "paused"}).json()
    assert [s["sandboxID"] for s in paused] == ids[:1]
    for sid in ids:
        assert c.delete(f"/sandboxes/{sid}").status_code == 204


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"nextToken": "garbage"}, "nextToken"),
        ({"state": "sleeping"}, "state"),
        ({"order": "sideways"}, "order"),
        ({"startedAfter": "yesterday"}, "startedAfter"),
        ({"metadata": "no-equals-sign"}, "metadata"),
    ],
)
def test_bad_list_queries_are_400(c: httpx.Client, params: dict[str, Any], match: str) -> None:
    _error(c.get("/v2/sandboxes", params=params), 400, match)


def test_errors_outside_e2b_keep_kiln_s_shape(
    c: httpx.Client, live: LiveServer, keys: tuple[str, str]
) -> None:
    r = httpx.get(live.url + "/sandboxes/nope", headers={"Authorization": f"Bearer {keys[0]}"})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert set(httpx.get(live.url + "/sandboxes").json()) == {"error"}  # 401
    _error(c.get("/no/such/route"), 404)
    r = c.put("/v2/sandboxes", json={})
    _error(r, 405)
    assert "POST" in r.headers["Allow"]


def test_the_key_file_is_in_the_data_dir(live: LiveServer) -> None:
    assert (Path(live.services.config.data_dir) / "e2b-envd.key").stat().st_mode & 0o777 == 0o600


def test_templates_are_kiln_images_or_kiln_templates(
    c: httpx.Client, live: LiveServer, keys: tuple[str, str]
) -> None:
    kiln = httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {keys[0]}"})
    with kiln:
        r = kiln.post("/templates", json={"name": "big", "cpus": 2, "memory_mb": 1024})
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        for template in ("big", tid):
            body = _create(c, templateID=template)
            assert body["templateID"] == template
            detail = c.get(f"/sandboxes/{body['sandboxID']}").json()
            assert (detail["cpuCount"], detail["memoryMB"], detail["templateID"]) == (
                2,
                1024,
                template,
            )
            assert c.delete(f"/sandboxes/{body['sandboxID']}").status_code == 204
        minimal = _create(c, templateID="minimal")
        assert live.store.get_sandbox(minimal["sandboxID"]).image == "minimal"
        assert c.delete(f"/sandboxes/{minimal['sandboxID']}").status_code == 204
    # Another user's template is not theirs to use.
    with httpx.Client(base_url=live.url + E2B, headers={"X-API-KEY": keys[1]}) as other:
        _error(other.post("/v2/sandboxes", json={"templateID": "big"}), 404, "not found")


def test_an_idempotency_key_makes_a_retry_get_the_same_sandbox(
    c: httpx.Client, live: LiveServer, keys: tuple[str, str]
) -> None:
    body = {"templateID": "base", "metadata": {"idem": "1"}}
    key = {"Idempotency-Key": "retry-1"}

    # Concurrent retries too: the second waits for the first and gets its sandbox.
    def post(_: int) -> httpx.Response:
        return c.post("/v2/sandboxes", json=body, headers=key)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(post, range(3)))
    assert [r.status_code for r in answers] == [201, 201, 201]
    ids = {r.json()["sandboxID"] for r in answers}
    assert len(ids) == 1
    (sid,) = ids
    assert len(c.get("/v2/sandboxes", params={"metadata": "idem=1"}).json()) == 1
    other_body = {**body, "timeout": 60}
    _error(c.post("/v2/sandboxes", json=other_body, headers=key), 409, "another request")
    _error(c.post("/v2/sandboxes", json=body, headers={"Idempotency-Key": "Not OK"}), 400)
    with httpx.Client(base_url=live.url + E2B, headers={"X-API-KEY": keys[1]}) as other:
        theirs = other.post("/v2/sandboxes", json=body, headers=key)
        assert theirs.status_code == 201 and theirs.json()["sandboxID"] != sid
        assert other.delete(f"/sandboxes/{theirs.json()['sandboxID']}").status_code == 204
    assert c.delete(f"/sandboxes/{sid}").status_code == 204
    # Once that sandbox is gone, the key makes a new one.
    again = c.post("/v2/sandboxes", json=body, headers=key)
    assert again.status_code == 201 and again.json()["sandboxID"] != sid
    assert c.delete(f"/sandboxes/{again.json()['sandboxID']}").status_code == 204


def test_an_image_of_the_catalog_is_a_template(
    c: httpx.Client, live: LiveServer, keys: tuple[str, str]
) -> None:
    one = live.store.user_by_key(keys[0])
    assert one is not None
    live.store.add_image(
        one.id,
        "node",
        ref=f"{one.id}.node.0123456789ab",
        kind="packages",
        digest="d",
        size_bytes=1,
        definition={"name": "node", "packages": ["nodejs"], "env": {"N": "1"}},
    )
    body = _create(c, templateID="node")
    sandbox = live.store.get_sandbox(body["sandboxID"])
    assert sandbox.image == f"{one.id}.node.0123456789ab"
    # Another user's image is as unknown to them as any other name.
    with httpx.Client(base_url=live.url + E2B, headers={"X-API-KEY": keys[1]}) as two:
        r = two.post("/v2/sandboxes", json={"templateID": "node"})
        _error(r, 404, "template 'node' not found")
    assert c.delete(f"/sandboxes/{body['sandboxID']}").status_code == 204

    # Through kiln's API: the definition its use registered in the image cache goes too.
    kiln_api = {"Authorization": f"Bearer {keys[0]}"}
    assert httpx.delete(f"{live.url}/images/node", headers=kiln_api).status_code == 204
    defs = live.services.catalog.image_dir / "defs"
    assert not (defs / f"{one.id}.node.0123456789ab.json").exists()
