"""Saved images over real HTTP: ``POST /sandboxes/{id}/save``, ``/saved-images``, and
creates from one, against real test-mode agents (their work dirs are the "disk" the
fake engine saves) and a real SQLite store, including a daemon restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from kiln.server.intents import Intent, Intents, finish_interrupted
from kiln.store import Quotas

from .conftest import ApiUser
from .harness import AgentEngine, LiveServer

SAVED_FIELDS = {
    "id",
    "name",
    "engine",
    "image",
    "cpus",
    "memory_mb",
    "size_bytes",
    "memory",
    "source_id",
    "created_at",
}


def _write(api: ApiUser, sandbox: str, path: str, text: str) -> None:
    out = api.exec(sandbox, "sh", "-c", f"printf %s '{text}' > {path}")
    assert out["exit_code"] == 0, out


def _cat(api: ApiUser, sandbox: str, path: str) -> str:
    out = api.exec(sandbox, "cat", path)
    assert out["exit_code"] == 0, out
    return str(out["stdout"])


def _save(api: ApiUser, sandbox: str, name: str) -> dict[str, object]:
    r = api.http.post(f"/sandboxes/{sandbox}/save", json={"name": name})
    assert r.status_code == 201, r.text
    data: dict[str, object] = r.json()
    return data


def test_two_sandboxes_from_a_saved_image_have_its_files(api: ApiUser) -> None:
    src = api.sandbox(name="src", cpus=2, memory_mb=256, env={"GREETING": "hi"})
    _write(api, "src", "saved.txt", "from before the save")
    saved = _save(api, "src", "snap")
    assert set(saved) == SAVED_FIELDS
    assert (saved["name"], saved["source_id"], saved["engine"]) == (
        "snap",
        src["id"],
        src["engine"],
    )
    assert (saved["cpus"], saved["memory_mb"], saved["image"]) == (2, 256, src["image"])
    assert saved["memory"] is False  # the fake engine saves files only
    # The source goes on; what it writes now is not in the image.
    _write(api, "src", "later.txt", "after")
    assert api.http.get("/sandboxes/src").json()["status"] == "running"

    made = [api.sandbox(name=f"copy{i}", saved_image="snap") for i in (1, 2)]
    for sb in made:
        assert (sb["cpus"], sb["memory_mb"], sb["image"]) == (2, 256, src["image"])
        assert sb["id"] != src["id"]
        assert _cat(api, str(sb["name"]), "saved.txt") == "from before the save"
        assert api.exec(str(sb["name"]), "cat", "later.txt")["exit_code"] != 0
        # The saved sandbox's env comes with it.
        assert api.exec(str(sb["name"]), "sh", "-c", "printf %s $GREETING")["stdout"] == "hi"
    _write(api, "copy1", "mine.txt", "only copy1")
    assert api.exec("copy2", "cat", "mine.txt")["exit_code"] != 0

    assert api.http.get("/saved-images").json() == [saved]
    assert api.http.get("/saved-images/snap").json() == saved
    # Deleting it leaves what was made from it.
    assert api.http.delete("/saved-images/snap").status_code == 204
    assert api.http.get("/saved-images").json() == []
    assert _cat(api, "copy1", "saved.txt") == "from before the save"
    r = api.http.post("/sandboxes", json={"saved_image": "snap"})
    assert r.status_code == 404, r.text
    assert api.http.delete("/saved-images/snap").status_code == 404


def test_another_user_can_neither_see_nor_use_it(make_user: Callable[..., ApiUser]) -> None:
    owner, other = make_user(), make_user()
    owner.sandbox(name="src")
    _write(owner, "src", "secret.txt", "owners")
    _save(owner, "src", "private")

    assert other.http.get("/saved-images").json() == []
    assert other.http.get("/saved-images/private").status_code == 404
    r = other.http.post("/sandboxes", json={"saved_image": "private"})
    assert r.status_code == 404, r.text
    assert "saved image 'private' not found" in r.json()["error"]
    assert other.http.get("/sandboxes").json() == []  # nothing was made
    assert other.http.delete("/saved-images/private").status_code == 404
    assert other.http.post("/sandboxes/src/save", json={"name": "x"}).status_code == 404
    # Names are per owner: the other user may use the same one for their own.
    other.sandbox(name="theirs")
    theirs = _save(other, "theirs", "private")
    assert theirs["id"] != owner.http.get("/saved-images/private").json()["id"]
    mine = owner.sandbox(saved_image="private")
    assert _cat(owner, str(mine["name"]), "secret.txt") == "owners"
    assert owner.http.delete("/saved-images/private").status_code == 204
    assert other.http.get("/saved-images/private").status_code == 200


def test_bad_saves_and_creates_are_refused(make_user: Callable[..., ApiUser]) -> None:
    api = make_user(Quotas(max_sandboxes=2))
    api.sandbox(name="src", cpus=1, memory_mb=256)
    _save(api, "src", "snap")
    taken = api.http.post("/sandboxes/src/save", json={"name": "snap"})
    assert taken.status_code == 409 and "already exists" in taken.json()["error"]
    assert api.http.post("/sandboxes/nope/save", json={"name": "n"}).status_code == 404
    for body in ({}, {"name": "no spaces"}, {"name": ""}, {"name": 3}, {"name": "a", "x": 1}):
        r = api.http.post("/sandboxes/src/save", json=body)
        assert r.status_code == 422, (body, r.text)
    assert api.http.post("/sandboxes/src/save").status_code == 422  # no body
    for body in (
        {"env": {"A": "b"}},
        {"init": "true"},
        {"cpus": 2},
        {"memory_mb": 512},
        {"image": "other"},
        {"engine": "docker"},
        {"new_volumes": [{"name": "v", "mount": "/v", "size_mb": 8}]},
    ):
        r = api.http.post("/sandboxes", json={"saved_image": "snap", **body})
        assert r.status_code == 422, (body, r.text)
    # The shape it has anyway is fine to repeat.
    ok = api.http.post("/sandboxes", json={"saved_image": "snap", "cpus": 1, "memory_mb": 256})
    assert ok.status_code == 201, ok.text
    over = api.http.post("/sandboxes", json={"saved_image": "snap"})
    assert over.status_code == 403, over.text  # the quota counts them
    assert api.http.get("/saved-images/no%20such").status_code == 404
    assert [s["name"] for s in api.http.get("/saved-images").json()] == ["snap"]


def test_a_sandbox_with_volumes_cannot_be_saved(api: ApiUser) -> None:
    api.sandbox(name="vol", new_volumes=[{"name": "data", "size_mb": 8, "mount": "/data"}])
    r = api.http.post("/sandboxes/vol/save", json={"name": "v"})
    assert r.status_code == 409 and "volumes attached" in r.json()["error"]
    assert api.http.get("/saved-images").json() == []


def test_a_saved_image_survives_a_daemon_restart(tmp_path: Path) -> None:
    first = LiveServer(tmp_path).start()
    try:
        user, key = first.store.create_user("restarter")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=first.url, headers=headers, timeout=30) as http:
            api = ApiUser(user, key, http)
            api.sandbox(name="src")
            _write(api, "src", "kept.txt", "across restarts")
            saved = _save(api, "src", "durable")
            assert http.delete("/sandboxes/src").status_code == 204  # not needed either
    finally:
        first.stop()
    second = LiveServer(tmp_path).start()
    try:
        with httpx.Client(base_url=second.url, headers=headers, timeout=30) as http:
            api = ApiUser(user, key, http)
            assert http.get("/saved-images").json() == [saved]
            sb = api.sandbox(name="again", saved_image="durable")
            assert _cat(api, str(sb["name"]), "kept.txt") == "across restarts"
            assert http.delete("/sandboxes/again").status_code == 204
            assert http.delete("/saved-images/durable").status_code == 204
    finally:
        second.stop()
    assert not (tmp_path / "engine" / "saved" / "fake" / str(saved["id"])).exists()
    assert (tmp_path / "engine" / "saved" / "fake").is_dir()  # where it was


def test_saved_images_are_images_too(server: LiveServer, make_user: Callable[..., ApiUser]) -> None:
    """``/images`` lists a saved sandbox (``kind: saved``), ``image`` on create takes its
    name, ``DELETE /images/{name}`` deletes it; saved and built images share one
    namespace per user."""
    alice, bob = make_user(), make_user()
    alice.sandbox(name="src")
    _write(alice, "src", "saved.txt", "kept")
    saved = _save(alice, "src", "work")
    listed = {i["name"]: i for i in alice.http.get("/images").json()}
    assert (listed["work"]["kind"], listed["work"]["scope"]) == ("saved", "user")
    assert listed["work"]["size_bytes"] == saved["size_bytes"]
    assert alice.http.get("/images/work").json() == listed["work"]
    assert "work" not in [i["name"] for i in bob.http.get("/images").json()]
    assert bob.http.get("/images/work").status_code == 404
    assert bob.http.post("/sandboxes", json={"image": "work"}).status_code == 422

    sb = alice.sandbox(name="from-image", image="work")
    assert _cat(alice, str(sb["name"]), "saved.txt") == "kept"
    # What a saved image fixes still cannot be asked for differently.
    r = alice.http.post("/sandboxes", json={"image": "work", "cpus": 2})
    assert r.status_code == 422 and "cpus" in r.json()["error"]

    # One name, one image: a build cannot take a saved image's name, nor a save a
    # built (or global) image's.
    server.store.add_image(
        alice.user.id,
        "built",
        ref="x.built.1",
        kind="packages",
        digest="1",
        size_bytes=0,
        definition={},
    )
    r = alice.http.post("/sandboxes/src/save", json={"name": "built"})
    assert r.status_code == 409 and "'built'" in r.json()["error"]
    r = alice.http.post("/images", json={"name": "work", "packages": ["jq"]})
    assert r.status_code == 409 and "'work'" in r.json()["error"]
    r = alice.http.post("/sandboxes/src/save", json={"name": "minimal"})
    assert r.status_code == 409

    assert alice.http.delete("/images/work").status_code == 204
    assert alice.http.get("/saved-images").json() == []
    assert alice.http.get("/images/work").status_code == 404


def test_a_save_a_crash_cut_short_leaves_no_files(server: LiveServer, api: ApiUser) -> None:
    """A daemon killed after the engine saved but before the row was written: the next
    start's intents delete the files nobody can name; an image with its row stays."""
    api.sandbox(name="crashy")
    kept = _save(api, "crashy", "kept")
    lost = _save(api, "crashy", "lost")
    engine = server.engine
    assert isinstance(engine, AgentEngine)
    server.store.delete_saved_image(api.user.id, "lost")  # as if its row never came
    intents = Intents(server.root / "intents-test")
    for image in (kept, lost):
        intents.begin(Intent(str(image["id"]), "save", api.user.id, engine=engine.name))
    assert engine.saved_image(str(lost["id"])) is not None
    done = server.call(lambda: finish_interrupted(server.store, engine, intents))
    assert sorted(done) == sorted(f"save of {i['id']} cleaned up" for i in (kept, lost))
    assert engine.saved_image(str(lost["id"])) is None
    assert engine.saved_image(str(kept["id"])) is not None
    assert intents.pending() == []
    sb = api.sandbox(name="still", saved_image="kept")
    assert sb["engine"] == kept["engine"]


def test_saved_images_count_against_the_image_disk_quota(
    server: LiveServer, make_user: Callable[..., ApiUser]
) -> None:
    api = make_user(Quotas(max_image_disk_mb=1))
    api.sandbox(name="big")
    _write(api, "big", "small.txt", "x")
    first = _save(api, "big", "small")
    assert 0 < int(str(first["size_bytes"])) < 1 << 20
    engine = server.engine
    assert isinstance(engine, AgentEngine)
    saved_root = engine.saved_root()
    assert saved_root is not None
    # 2 MiB more on its disk: its image would take the user over the 1 MiB quota.
    out = api.exec("big", "sh", "-c", "head -c 2097152 /dev/zero > big.bin")
    assert out["exit_code"] == 0, out
    before = set(saved_root.iterdir())
    r = api.http.post("/sandboxes/big/save", json={"name": "too-big"})
    assert r.status_code == 403 and "1 MiB" in r.json()["error"], r.text
    assert [i["name"] for i in api.http.get("/saved-images").json()] == ["small"]
    assert set(saved_root.iterdir()) == before  # nothing of it stays
    # Built and saved images share the quota: its listing counts what it holds.
    assert api.http.get("/images/small").json()["size_bytes"] == first["size_bytes"]
