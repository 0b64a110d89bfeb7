"""Sandbox lifecycle over real HTTP: create, list, get, patch, stop/start, delete."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime

import httpx
import pytest

from kiln.engine.base import Thermal
from kiln.store import Quotas

from .conftest import ApiUser
from .harness import LiveServer

SANDBOX_FIELDS = {
    "id",
    "name",
    "status",
    "thermal",
    "ip",
    "cpus",
    "memory_mb",
    "keep_hot",
    "engine",
    "runtime",
    "capabilities",
    "image",
    "created_at",
    "last_active_at",
    "labels",
    "expires_at",
    "on_expire",
    "network",
    "last_boot",
    "node",
}


def test_health_needs_no_key_and_counts_sandboxes(anon: httpx.Client, api: ApiUser) -> None:
    before = anon.get("/health").json()
    api.sandbox()
    r = anon.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["engine"] == "fake"
    assert body["sandboxes"] == before["sandboxes"] + 1
    assert isinstance(body["uptime_s"], float) and body["uptime_s"] >= before["uptime_s"]


def test_openapi_schema_is_served(anon: httpx.Client) -> None:
    r = anon.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in ("/sandboxes", "/sandboxes/{sandbox}/exec", "/sandboxes/{sandbox}/files"):
        assert path in paths


def test_openapi_names_operations_and_declares_the_key(anon: httpx.Client) -> None:
    doc = anon.get("/openapi.json").json()
    assert doc["paths"]["/sandboxes"]["post"]["operationId"] == "create_sandbox"
    assert doc["paths"]["/sandboxes/{sandbox}/exec"]["post"]["operationId"] == "exec_command"
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A kiln API key: `Authorization: Bearer kiln_...`",
    }
    assert doc["paths"]["/sandboxes"]["get"]["security"] == [{"apiKey": []}]
    assert "security" not in doc["paths"]["/health"]["get"]  # no key needed


def test_interactive_docs_are_served(anon: httpx.Client) -> None:
    for path in ("/docs", "/redoc"):
        r = anon.get(path)
        assert r.status_code == 200, path
        assert "/openapi.json" in r.text and "<html" in r.text.lower()


def test_crud_lifecycle(api: ApiUser, server: LiveServer) -> None:
    created = api.sandbox(name="life", cpus=2, memory_mb=256, keep_hot=True)
    assert set(created) == SANDBOX_FIELDS
    assert created["name"] == "life"
    assert created["status"] == "running"
    assert created["thermal"] == "hot"
    assert (created["cpus"], created["memory_mb"], created["keep_hot"]) == (2, 256, True)
    assert created["engine"] == "fake" and created["image"] == "minimal"
    assert created["ip"]
    assert created["runtime"] is None
    assert created["capabilities"] == {"pause": True, "snapshots": True, "fork": True}
    for key in ("created_at", "last_active_at"):
        assert datetime.fromisoformat(str(created[key])).tzinfo is not None
    assert created["last_boot"]["reason"] == "created"
    assert datetime.fromisoformat(created["last_boot"]["at"]).tzinfo is not None

    listed = api.http.get("/sandboxes").json()
    assert [s["id"] for s in listed] == [created["id"]]
    by_id = api.http.get(f"/sandboxes/{created['id']}").json()
    by_name = api.http.get("/sandboxes/life").json()
    assert by_id["id"] == by_name["id"] == created["id"]

    r = api.http.delete("/sandboxes/life")
    assert r.status_code == 204 and r.content == b""
    assert api.http.get(f"/sandboxes/{created['id']}").status_code == 404
    assert api.http.get("/sandboxes").json() == []
    assert created["id"] not in server.engine.boxes  # the engine freed it
    assert server.store.get_sandbox(str(created["id"]), include_deleted=True).deleted_at


def test_last_boot_follows_stop_and_start(api: ApiUser) -> None:
    """A stop does not boot anything; the start's restore from the snapshot says so."""
    api.sandbox(name="boots")
    assert api.http.post("/sandboxes/boots/stop").json()["last_boot"]["reason"] == "created"
    started = api.http.post("/sandboxes/boots/start").json()
    assert started["last_boot"]["reason"] == "restored"
    assert api.http.get("/sandboxes/boots").json()["last_boot"] == started["last_boot"]


def test_defaults_and_generated_name(api: ApiUser) -> None:
    r = api.http.post("/sandboxes")  # no body at all: every field is optional
    assert r.status_code == 201, r.text
    sb = r.json()
    assert (sb["cpus"], sb["memory_mb"], sb["keep_hot"]) == (1, 512, False)
    assert sb["name"]
    assert api.http.get(f"/sandboxes/{sb['name']}").json()["id"] == sb["id"]
    assert api.http.post("/sandboxes", json={}).status_code == 201


def test_name_taken_is_409_and_free_again_after_delete(api: ApiUser) -> None:
    api.sandbox(name="dup")
    r = api.http.post("/sandboxes", json={"name": "dup"})
    assert r.status_code == 409
    assert "dup" in r.json()["error"]
    assert api.http.delete("/sandboxes/dup").status_code == 204
    api.sandbox(name="dup")


def test_names_resolve_everywhere(api: ApiUser) -> None:
    sb = api.sandbox(name="named")
    assert api.exec("named", "echo", "hi")["stdout"] == "hi\n"
    assert api.http.get("/sandboxes/named/sessions").status_code == 200
    assert api.http.put("/sandboxes/named/files?path=f", content=b"x").status_code == 200
    assert api.http.get("/sandboxes/named/files?path=f").content == b"x"
    assert api.http.post("/sandboxes/named/stop").json()["id"] == sb["id"]
    assert api.http.post("/sandboxes/named/start").json()["id"] == sb["id"]


def test_list_and_get_never_wake(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="sleepy")
    sid = str(sb["id"])
    server.call(lambda: server.engine.pause(sid))
    calls = len(server.engine.calls)
    assert api.http.get("/sandboxes").json()[0]["thermal"] == "warm"
    assert api.http.get("/sandboxes/sleepy").json()["thermal"] == "warm"
    assert server.engine.thermal(sid) is Thermal.WARM
    assert server.engine.calls[calls:] == []  # not even an agent() call
    # Anything that touches the sandbox makes it hot first.
    assert api.exec("sleepy", "true")["exit_code"] == 0
    assert server.engine.thermal(sid) is Thermal.HOT


def test_requests_record_host_activity(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox()
    sid = str(sb["id"])
    before = server.thermal.count.get(sid, 0)
    api.exec(sid, "true")
    assert server.thermal.count[sid] > before
    listed = server.thermal.count[sid]
    api.http.get(f"/sandboxes/{sid}")
    assert server.thermal.count[sid] == listed  # reading is not activity


def test_stop_and_start(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="cycle")
    api.http.put("/sandboxes/cycle/files?path=keep.txt", content=b"kept")
    r = api.http.post("/sandboxes/cycle/stop")
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["thermal"]) == ("stopped", "cold")
    row = server.store.get_sandbox(str(sb["id"]))
    assert row.status == "stopped" and row.engine_state is not None
    assert api.http.get("/sandboxes/cycle").json()["status"] == "stopped"

    r = api.http.post("/sandboxes/cycle/start")
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["thermal"]) == ("running", "hot")
    assert api.http.get("/sandboxes/cycle/files?path=keep.txt").content == b"kept"


def test_using_a_stopped_sandbox_restores_it(api: ApiUser) -> None:
    api.sandbox(name="woken")
    api.http.post("/sandboxes/woken/stop")
    assert api.exec("woken", "echo", "back")["stdout"] == "back\n"
    assert api.http.get("/sandboxes/woken").json()["status"] == "running"


def test_a_sandbox_whose_machine_died_boots_again_on_next_use(
    api: ApiUser, server: LiveServer
) -> None:
    sid = str(api.sandbox(name="phoenix")["id"])
    api.exec("phoenix", "sh", "-c", "echo kept > kept.txt")

    async def crash() -> None:
        server.engine.crash(sid)

    server.call(crash)
    view = api.http.get("/sandboxes/phoenix").json()
    assert (view["status"], view["thermal"]) == ("running", "cold")
    assert api.exec("phoenix", "cat", "kept.txt")["stdout"] == "kept\n"
    view = api.http.get("/sandboxes/phoenix").json()
    assert (view["status"], view["thermal"]) == ("running", "hot")
    assert view["last_boot"]["reason"] == "rebooted"
    row = server.store.get_sandbox(sid)
    assert row.status == "running" and row.thermal == "hot"
    assert row.engine_state is not None
    assert row.engine_state["last_boot"]["reason"] == "rebooted"


def test_a_sandbox_whose_machine_died_with_its_disk_can_only_be_deleted(
    api: ApiUser, server: LiveServer
) -> None:
    sid = str(api.sandbox(name="broken")["id"])

    async def crash() -> None:
        server.engine.crash(sid, disk_gone=True)

    server.call(crash)
    assert api.http.get("/sandboxes/broken").json()["status"] == "error"
    for method, suffix, body in (
        ("POST", "/stop", None),
        ("POST", "/start", None),
        ("POST", "/exec", {"cmd": ["true"]}),
    ):
        r = api.http.request(method, f"/sandboxes/broken{suffix}", json=body)
        assert r.status_code == 409, (suffix, r.text)
        assert "its disk /fake/rootfs is missing; it can only be deleted" in r.json()["error"]
    assert server.store.get_sandbox(sid).status == "running"  # the store was not touched
    assert api.http.delete("/sandboxes/broken").status_code == 204


def test_patch_rename_and_keep_hot(api: ApiUser) -> None:
    sb = api.sandbox(name="before")
    api.sandbox(name="other")
    r = api.http.patch("/sandboxes/before", json={"name": "after", "keep_hot": True})
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["keep_hot"]) == ("after", True)
    assert api.http.get("/sandboxes/before").status_code == 404
    assert api.http.get("/sandboxes/after").json()["id"] == sb["id"]
    taken = api.http.patch("/sandboxes/after", json={"name": "other"})
    assert taken.status_code == 409
    assert api.http.patch("/sandboxes/after", json={"name": "bad name!"}).status_code == 422
    assert api.http.patch("/sandboxes/after", json={"keep_hot": "yes"}).status_code == 422


def test_rename_does_not_disturb_a_running_session(api: ApiUser) -> None:
    api.sandbox(name="busy")
    # A long-running command streams while the sandbox is renamed under it.
    with api.http.stream(
        "POST",
        "/sandboxes/busy/exec",
        json={"cmd": ["sh", "-c", "echo start; sleep 0.6; echo end"]},
        headers={"Accept": "application/x-ndjson"},
    ) as stream:
        lines = stream.iter_lines()
        assert '"start' in next(lines)
        assert api.http.patch("/sandboxes/busy", json={"name": "renamed"}).status_code == 200
        rest = list(lines)
    assert any('"end' in line for line in rest)
    assert rest[-1] == '{"type":"exit","exit_code":0}'
    assert api.exec("renamed", "echo", "ok")["stdout"] == "ok\n"


def test_users_see_only_their_own(make_user: Callable[..., ApiUser]) -> None:
    alice, bob = make_user(), make_user()
    sb = alice.sandbox(name="mine")
    for path in (f"/sandboxes/{sb['id']}", "/sandboxes/mine"):
        assert bob.http.get(path).status_code == 404
        assert bob.http.delete(path).status_code == 404
        assert bob.http.post(f"{path}/exec", json={"cmd": ["true"]}).status_code == 404
        assert bob.http.get(f"{path}/files?path=x").status_code == 404
        assert bob.http.patch(path, json={"name": "stolen"}).status_code == 404
    assert bob.http.get("/sandboxes").json() == []
    # The same name is free for another user.
    assert bob.sandbox(name="mine")["id"] != sb["id"]
    assert alice.http.get("/sandboxes/mine").json()["id"] == sb["id"]


def test_quota_exceeded_is_403(make_user: Callable[..., ApiUser]) -> None:
    limited = make_user(Quotas(max_sandboxes=1, max_cpus=2, max_memory_mb=1024))
    r = limited.http.post("/sandboxes", json={"cpus": 4})
    assert r.status_code == 403 and "cpus" in r.json()["error"]
    r = limited.http.post("/sandboxes", json={"memory_mb": 2048})
    assert r.status_code == 403
    first = limited.sandbox()
    r = limited.http.post("/sandboxes", json={})
    assert r.status_code == 403
    assert "1" in r.json()["error"]
    limited.http.delete(f"/sandboxes/{first['id']}")
    limited.sandbox()


def test_engine_failure_rolls_back(api: ApiUser, server: LiveServer) -> None:
    from kiln.engine.errors import InvalidState  # noqa: PLC0415

    original = server.engine.create

    async def failing(spec: object) -> object:
        raise InvalidState("no room for it")

    server.engine.create = failing  # type: ignore[method-assign,assignment]
    try:
        r = api.http.post("/sandboxes", json={"name": "doomed", "new_volumes": []})
    finally:
        server.engine.create = original  # type: ignore[method-assign]
    assert r.status_code == 409
    assert r.json() == {"error": "no room for it"}
    assert api.http.get("/sandboxes").json() == []
    api.sandbox(name="doomed")  # the name was not left taken


@pytest.mark.parametrize("ref", ["nope", "sb-000000000000", "a%2Fb", "x" * 80, "%00"])
def test_unknown_sandbox_is_404(api: ApiUser, ref: str) -> None:
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/stop"), ("GET", "/ports")):
        r = api.http.request(method, f"/sandboxes/{ref}{suffix}")
        assert r.status_code == 404, (method, suffix, r.text)
        assert "error" in r.json()


def test_listening_ports(make_user: Callable[..., ApiUser]) -> None:
    api = make_user()
    sb = api.sandbox(name="web")
    # The test-mode agent shares this host's network: a socket we listen on is
    # "inside the sandbox" as far as /proc/net/tcp is concerned.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ports = api.http.get("/sandboxes/web/ports").json()
        entry = next(p for p in ports if p["port"] == port)
        assert entry["proxy_url"] == f"/sandboxes/{sb['id']}/proxy/{port}/"
        assert all(p["port"] not in (1024, 1025) for p in ports)
        everywhere = api.http.get("/ports").json()
        assert any(p["port"] == port and p["sandbox_id"] == sb["id"] for p in everywhere)
    assert api.http.get("/sandboxes/web/ports").status_code == 200


def test_fork_over_the_api(make_user: Callable[..., ApiUser], server: LiveServer) -> None:
    from kiln.engine.errors import InvalidState  # noqa: PLC0415

    api = make_user(Quotas(max_sandboxes=3))
    src = api.sandbox(name="src", cpus=2, memory_mb=256, labels={"team": "ml"}, env={"A": "b"})
    r = api.http.post("/sandboxes/src/fork", json={"name": "copy"})
    assert r.status_code == 201, r.text
    copy = r.json()
    assert set(copy) == SANDBOX_FIELDS
    assert copy["id"] != src["id"] and copy["name"] == "copy"
    for field in ("cpus", "memory_mb", "labels", "engine", "image", "keep_hot"):
        assert copy[field] == src[field], field
    assert (copy["status"], copy["thermal"]) == ("running", "hot")
    assert copy["ip"] != src["ip"]
    assert copy["capabilities"]["fork"] is True

    assert api.http.post("/sandboxes/src/fork", json={"name": "copy"}).status_code == 409
    unnamed = api.http.post("/sandboxes/copy/fork")  # no body: named by its id
    assert unnamed.status_code == 201, unnamed.text
    assert unnamed.json()["name"] == unnamed.json()["id"]
    over = api.http.post("/sandboxes/src/fork", json={})
    assert over.status_code == 403, over.text  # the quota counts forks
    assert api.http.post("/sandboxes/nope/fork").status_code == 404
    assert make_user().http.post("/sandboxes/src/fork").status_code == 404  # not theirs
    bad = api.http.post("/sandboxes/src/fork", json={"name": "no spaces"})
    assert bad.status_code == 422

    api.http.delete(f"/sandboxes/{unnamed.json()['id']}")
    original = server.engine.fork

    async def failing(source_id: str, spec: object) -> object:
        raise InvalidState("cannot copy it now")

    server.engine.fork = failing  # type: ignore[method-assign,assignment]
    try:
        r = api.http.post("/sandboxes/src/fork", json={"name": "doomed"})
    finally:
        server.engine.fork = original  # type: ignore[method-assign]
    assert r.status_code == 409 and r.json() == {"error": "cannot copy it now"}
    assert sorted(s["name"] for s in api.http.get("/sandboxes").json()) == ["copy", "src"]
    api.http.delete("/sandboxes/copy")  # the source stays
    assert api.http.get("/sandboxes/src").json()["status"] == "running"
