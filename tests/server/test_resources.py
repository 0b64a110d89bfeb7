"""Templates, secrets and volumes: CRUD, isolation, and their use by sandboxes."""

from __future__ import annotations

from collections.abc import Callable

from .conftest import ApiUser
from .harness import LiveServer

# --- templates ----------------------------------------------------------------------------


def test_template_crud(api: ApiUser) -> None:
    body = {
        "name": "py",
        "cpus": 2,
        "memory_mb": 1024,
        "env": {"LANG_X": "py"},
        "init": "echo ready",
        "image": "minimal",
        "volumes": [{"name": "cache", "mount": "/cache"}],
    }
    r = api.http.post("/templates", json=body)
    assert r.status_code == 201, r.text
    tpl = r.json()
    assert tpl["id"] and tpl["name"] == "py" and tpl["created_at"]
    for key, value in body.items():
        assert tpl[key] == value
    assert api.http.get("/templates").json() == [tpl]
    assert api.http.get(f"/templates/{tpl['id']}").json() == tpl
    assert api.http.get("/templates/py").json() == tpl  # by name too
    assert api.http.post("/templates", json={"name": "py"}).status_code == 409
    assert api.http.delete("/templates/py").status_code == 204
    assert api.http.get(f"/templates/{tpl['id']}").status_code == 404
    assert api.http.delete(f"/templates/{tpl['id']}").status_code == 404


def test_sandbox_from_template(api: ApiUser) -> None:
    tpl = api.http.post(
        "/templates", json={"name": "base", "cpus": 2, "memory_mb": 256, "env": {"T": "tpl"}}
    ).json()
    sb = api.sandbox(template_id=tpl["id"], env={"OWN": "own"})
    assert (sb["cpus"], sb["memory_mb"]) == (2, 256)
    out = api.exec(str(sb["id"]), "sh", "-c", 'echo "$T $OWN"')
    assert out["stdout"] == "tpl own\n"
    # Request fields override the template's; the template can be named.
    sb2 = api.sandbox(template_id="base", cpus=1)
    assert (sb2["cpus"], sb2["memory_mb"]) == (1, 256)
    assert api.http.post("/sandboxes", json={"template_id": "tpl-nope"}).status_code == 404


def test_templates_are_per_user(make_user: Callable[..., ApiUser]) -> None:
    alice, bob = make_user(), make_user()
    tpl = alice.http.post("/templates", json={"name": "mine"}).json()
    assert bob.http.get(f"/templates/{tpl['id']}").status_code == 404
    assert bob.http.get("/templates").json() == []
    assert bob.http.post("/sandboxes", json={"template_id": tpl["id"]}).status_code == 404
    assert bob.http.post("/templates", json={"name": "mine"}).status_code == 201


def test_template_validation(api: ApiUser) -> None:
    for body in (
        {},
        {"name": "../etc"},
        {"name": "t", "cpus": 0},
        {"name": "t", "memory_mb": "big"},
        {"name": "t", "volumes": [{"name": "v", "mount": "relative"}]},
    ):
        assert api.http.post("/templates", json=body).status_code == 422, body


# --- secrets ------------------------------------------------------------------------------


def test_secret_crud_never_returns_values(api: ApiUser, server: LiveServer) -> None:
    value = "s3cr3t-value-xyz"
    r = api.http.post("/secrets", json={"name": "API_TOKEN", "value": value})
    assert r.status_code == 201
    assert value not in r.text
    assert set(r.json()) == {"name", "created_at", "updated_at"}
    r = api.http.post("/secrets", json={"name": "API_TOKEN", "value": value + "2"})  # replace
    assert r.status_code == 201
    listed = api.http.get("/secrets")
    assert [s["name"] for s in listed.json()] == ["API_TOKEN"]
    assert value not in listed.text
    # Encrypted at rest: the value is nowhere in the database file.
    raw = b"".join(p.read_bytes() for p in (server.root / "data").glob("kiln.db*"))
    assert value.encode() not in raw
    assert api.http.delete("/secrets/API_TOKEN").status_code == 204
    assert api.http.get("/secrets").json() == []
    assert api.http.delete("/secrets/API_TOKEN").status_code == 404


def test_secrets_join_the_sandbox_env(api: ApiUser, server: LiveServer) -> None:
    api.http.post("/secrets", json={"name": "DB_PASSWORD", "value": "hunter2"})
    sb = api.sandbox(name="withsecret", secrets=["DB_PASSWORD"], env={"OTHER": "x"})
    assert api.exec("withsecret", "sh", "-c", 'echo "$DB_PASSWORD"')["stdout"] == "hunter2\n"
    # The value is in the engine's spec (the VM's env) but never in the API or the store.
    assert "hunter2" not in api.http.get("/sandboxes/withsecret").text
    row = server.store.get_sandbox(str(sb["id"]))
    assert row.config.secrets == ("DB_PASSWORD",)
    assert "DB_PASSWORD" not in row.config.env
    r = api.http.post("/sandboxes", json={"secrets": ["MISSING"]})
    assert r.status_code == 404 and "MISSING" in r.json()["error"]


def test_secrets_are_per_user(make_user: Callable[..., ApiUser]) -> None:
    alice, bob = make_user(), make_user()
    alice.http.post("/secrets", json={"name": "KEY", "value": "alice"})
    assert bob.http.get("/secrets").json() == []
    assert bob.http.post("/sandboxes", json={"secrets": ["KEY"]}).status_code == 404
    assert bob.http.delete("/secrets/KEY").status_code == 404


def test_secret_validation(api: ApiUser) -> None:
    for body in (
        {"name": "X"},
        {"value": "v"},
        {"name": "1BAD", "value": "v"},
        {"name": "A-B", "value": "v"},
        {"name": "OK", "value": 5},
    ):
        assert api.http.post("/secrets", json=body).status_code == 422, body


# --- volumes ------------------------------------------------------------------------------


def test_volume_crud(api: ApiUser) -> None:
    r = api.http.post("/volumes", json={"name": "data", "size_mb": 64})
    assert r.status_code == 201
    vol = r.json()
    assert (vol["name"], vol["size_mb"], vol["attached_to"]) == ("data", 64, None)
    assert api.http.get("/volumes").json() == [vol]
    assert api.http.get("/volumes/data").json() == vol
    assert api.http.post("/volumes", json={"name": "data", "size_mb": 1}).status_code == 409
    assert api.http.delete("/volumes/data").status_code == 204
    assert api.http.get("/volumes/data").status_code == 404


def test_volume_in_use_cannot_be_deleted(api: ApiUser, server: LiveServer) -> None:
    api.http.post("/volumes", json={"name": "shared", "size_mb": 16})
    sb = api.sandbox(name="user1", volumes=[{"name": "shared", "mount": "/data"}])
    vol = api.http.get("/volumes/shared").json()
    assert (vol["attached_to"], vol["mount"]) == (sb["id"], "/data")
    # The engine was asked to attach it (made on first use: size given).
    spec = server.engine.specs[str(sb["id"])]
    assert len(spec.volumes) == 1 and spec.volumes[0].mount == "/data"
    assert spec.volumes[0].size_mb == 16

    r = api.http.delete("/volumes/shared")
    assert r.status_code == 409 and "error" in r.json()
    # Attached to one live sandbox at a time.
    r = api.http.post("/sandboxes", json={"volumes": [{"name": "shared", "mount": "/d"}]})
    assert r.status_code == 409
    api.http.delete("/sandboxes/user1")
    assert api.http.get("/volumes/shared").json()["attached_to"] is None
    assert api.http.delete("/volumes/shared").status_code == 204


def test_new_volumes_with_the_sandbox_outlive_it(api: ApiUser) -> None:
    sb = api.sandbox(new_volumes=[{"name": "fresh", "size_mb": 32, "mount": "/fresh"}])
    vol = api.http.get("/volumes/fresh").json()
    assert (vol["size_mb"], vol["attached_to"]) == (32, sb["id"])
    api.http.delete(f"/sandboxes/{sb['id']}")
    assert api.http.get("/volumes/fresh").json()["attached_to"] is None
    # Name clash with an existing volume: refused before anything is created.
    r = api.http.post(
        "/sandboxes", json={"new_volumes": [{"name": "fresh", "size_mb": 1, "mount": "/x"}]}
    )
    assert r.status_code == 409
    r = api.http.post("/sandboxes", json={"volumes": [{"name": "ghost", "mount": "/g"}]})
    assert r.status_code == 404 and "ghost" in r.json()["error"]


def test_volumes_are_per_user_and_validated(make_user: Callable[..., ApiUser]) -> None:
    alice, bob = make_user(), make_user()
    alice.http.post("/volumes", json={"name": "priv", "size_mb": 8})
    assert bob.http.get("/volumes/priv").status_code == 404
    assert bob.http.delete("/volumes/priv").status_code == 404
    r = bob.http.post("/sandboxes", json={"volumes": [{"name": "priv", "mount": "/p"}]})
    assert r.status_code == 404
    for body in (
        {"name": "v"},
        {"name": "v", "size_mb": 0},
        {"name": "../v", "size_mb": 1},
        {"name": "v", "size_mb": "1"},
    ):
        assert bob.http.post("/volumes", json=body).status_code == 422, body
    r = bob.http.post(
        "/sandboxes",
        json={
            "new_volumes": [
                {"name": "a", "size_mb": 1, "mount": "/same"},
                {"name": "b", "size_mb": 1, "mount": "/same"},
            ]
        },
    )
    assert r.status_code == 422
