"""The image catalog over real HTTP: builds through the real image builder (a child
process, the shared image cache), visibility per user, and the errors.

The package-list test image (``tests/images/data/jq.yaml``) is built before the
suite enters its network namespace (scripts/test); here its base tree is found in
the cache, so a build only runs the fast step (initramfs, mkfs: seconds). A build
that needs a new base runs mmdebstrap, which cannot reach a mirror from inside
the namespace: that is the failed build these tests look at.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.images import find_base, list_images
from kiln.images.cache import default_image_dir
from kiln.images.child import BUILDER_ENV
from kiln.images.definition import image_ref, load_yaml_file
from kiln.images.registry import DEFS_DIR, register
from kiln.store import Quotas

from .conftest import ApiUser
from .harness import LiveServer

JQ_YAML = Path(__file__).parents[1] / "images" / "data" / "jq.yaml"
SLOW_BUILDER = Path(__file__).resolve().parent / "slow_builder.py"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def jq_definition() -> dict[str, Any]:
    """The test image's definition; its base must have been built before the tests."""
    definition = load_yaml_file(JQ_YAML)
    ref = image_ref(definition, None)
    register(default_image_dir(), ref, definition)  # find_base resolves it by ref
    if find_base(ref) is None:
        pytest.fail(
            f"the {definition.name} image's base is not built: run `python -m kiln.images"
            f" ensure --definition {JQ_YAML}` outside the network namespace (scripts/test does)"
        )
    return definition.to_json()


@pytest.fixture
def admin(server: LiveServer) -> Iterator[ApiUser]:
    user, key = server.store.create_user(f"adm{secrets.token_hex(4)}", admin=True)
    http = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
    )
    yield ApiUser(user, key, http)
    http.close()


def _builds(user: ApiUser, body: dict[str, Any]) -> httpx.Response:
    return user.http.post("/images", json=body, timeout=300)


def _image_files(ref: str) -> list[Path]:
    return [i.path for i in list_images() if i.tier == ref]


def test_a_users_image_is_theirs_alone(
    make_user: Callable[..., ApiUser], jq_definition: dict[str, Any]
) -> None:
    alice, bob = make_user(), make_user()
    body = {**jq_definition, "name": "mine"}
    # Streamed: progress lines with the elapsed time, then the image.
    with alice.http.stream(
        "POST", "/images", json=body, headers={"Accept": "application/x-ndjson"}, timeout=300
    ) as r:
        assert r.status_code == 200
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert [e["type"] for e in events[:-1]] == ["progress"] * (len(events) - 1)
    assert any("cached: bookworm base rootfs" in e["message"] for e in events[:-1]), events
    assert any("mkfs.ext4" in e["message"] for e in events[:-1]), events
    assert all(e["elapsed_s"] >= 0 for e in events[:-1])
    assert events[-1]["type"] == "image", events[-1]
    image = events[-1]["image"]
    assert (image["name"], image["kind"], image["scope"]) == ("mine", "packages", "user")
    assert image["ref"] == f"{alice.user.id}.mine.{image['ref'].rsplit('.', 1)[1]}"
    assert image["packages"] == ["jq"] and image["size_bytes"] > 100 << 20
    assert "/usr/local/bin/kiln-hello" in image["files"]
    ref = image["ref"]
    assert len(_image_files(ref)) == 1

    # Listed for alice after the tiers; invisible to bob in every way.
    listing = alice.http.get("/images").json()
    assert listing[0]["name"] == "minimal" and listing[0]["scope"] == "builtin"
    assert "mine" in [i["name"] for i in listing]
    assert alice.http.get("/images/mine").json() == image
    assert "mine" not in [i["name"] for i in bob.http.get("/images").json()]
    assert bob.http.get("/images/mine").status_code == 404
    assert bob.http.delete("/images/mine").status_code == 404
    refused = bob.http.post("/sandboxes", json={"image": "mine"})
    assert refused.status_code == 422 and "'mine'" in refused.json()["error"]
    assert bob.http.post("/sandboxes", json={"image": ref}).status_code == 422

    # The same definition again is the same image; another one under the name is refused.
    again = _builds(alice, body)
    assert again.status_code == 200 and again.json() == image
    other = _builds(alice, {**body, "packages": ["tree"]})
    assert other.status_code == 409 and "delete it first" in other.json()["error"]

    # In use: no delete. The sandbox row and the engine get the reference; the
    # image's environment comes under the request's.
    assert image["env"] == {"KILN_TEST_IMAGE": "jq"}
    # The catalog is the record: a definition gone from the image cache comes back.
    registered_at = default_image_dir() / DEFS_DIR / f"{ref}.json"
    registered_at.unlink()
    sb = alice.sandbox(image="mine", env={"OWN": "1"})
    assert sb["image"] == ref
    assert registered_at.is_file()
    out = alice.exec(str(sb["id"]), "sh", "-c", "echo $KILN_TEST_IMAGE $OWN")["stdout"]
    assert out == "jq 1\n"
    over = alice.sandbox(image="mine", env={"KILN_TEST_IMAGE": "mine"})
    assert alice.exec(str(over["id"]), "sh", "-c", "echo $KILN_TEST_IMAGE")["stdout"] == "mine\n"
    assert alice.http.delete(f"/sandboxes/{over['id']}").status_code == 204
    busy = alice.http.delete("/images/mine")
    assert busy.status_code == 409 and "used by 1 sandbox" in busy.json()["error"]
    assert alice.http.delete(f"/sandboxes/{sb['id']}").status_code == 204
    assert alice.http.delete("/images/mine").status_code == 204
    assert alice.http.get("/images/mine").status_code == 404
    assert _image_files(ref) == []
    assert not (default_image_dir() / DEFS_DIR / f"{ref}.json").exists()


def test_an_admins_image_is_global(
    admin: ApiUser, make_user: Callable[..., ApiUser], jq_definition: dict[str, Any]
) -> None:
    user = make_user()
    name = f"shared-{secrets.token_hex(3)}"
    r = _builds(admin, {**jq_definition, "name": name})
    assert r.status_code == 201, r.text
    image = r.json()
    assert image["scope"] == "global" and image["ref"].startswith(f"{name}.")
    try:
        assert user.http.get(f"/images/{name}").json() == image
        assert user.sandbox(image=name)["image"] == image["ref"]
        refused = user.http.delete(f"/images/{name}")
        assert refused.status_code == 403 and "only an admin" in refused.json()["error"]
        # A user's own image of the same name shadows the global one, for them only.
        own = _builds(user, {**jq_definition, "name": name})
        assert own.status_code == 201 and own.json()["scope"] == "user"
        assert user.http.get(f"/images/{name}").json()["ref"] == own.json()["ref"]
        assert admin.http.get(f"/images/{name}").json()["ref"] == image["ref"]
        assert user.http.delete(f"/images/{name}").status_code == 204
        assert user.http.get(f"/images/{name}").json() == image
    finally:
        for sb in user.http.get("/sandboxes").json():
            user.http.delete(f"/sandboxes/{sb['id']}")
        assert admin.http.delete(f"/images/{name}").status_code == 204


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"name": "x", "packages": ["Bad_Name"]}, 422, "packages[0]"),
        ({"name": "x", "packages": ["jq"], "colour": "red"}, 422, "colour"),
        ({"name": "Upper"}, 422, "name"),
        ({"name": "x", "files": [{"path": "/proc/x", "content": ""}]}, 422, "/proc"),
        ({"name": "x", "files": [{"path": "rel", "content": ""}]}, 422, "absolute"),
        ({"name": "x", "files": [{"path": "/a", "content": "", "mode": "9"}]}, 422, "mode"),
        ({"name": "minimal", "packages": ["jq"]}, 409, "built-in"),
    ],
)
def test_bad_definitions_are_refused_before_building(
    api: ApiUser, body: dict[str, Any], status: int, needle: str
) -> None:
    r = _builds(api, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_tiers_cannot_be_deleted_and_unknown_images_are_404(api: ApiUser) -> None:
    assert api.http.get("/images/minimal").json()["kind"] == "tier"
    assert api.http.delete("/images/minimal").status_code == 403
    assert api.http.get("/images/nope").status_code == 404


def test_image_disk_quota(make_user: Callable[..., ApiUser], jq_definition: dict[str, Any]) -> None:
    small = make_user(Quotas(max_image_disk_mb=1))
    r = _builds(small, {**jq_definition, "name": "big"})
    assert r.status_code == 403 and "limit of 1 MiB" in r.json()["error"], r.text
    assert small.http.get("/images/big").status_code == 404
    ref = image_ref(load_yaml_file(JQ_YAML, name="big"), small.user.id)
    assert _image_files(ref) == []  # the refused build left nothing behind


def test_a_failed_build_names_its_step_and_keeps_its_log(api: ApiUser) -> None:
    # A package list whose base is not cached: mmdebstrap cannot reach a mirror here.
    body = {"name": "broken", "packages": ["kiln-no-such-package"]}
    r = _builds(api, body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error.startswith("image build failed: step 'base' failed: mmdebstrap"), error
    log = Path(error.rsplit("build log: ", 1)[1].strip())
    assert log.is_file() and "step base failed" in log.read_text()
    assert api.http.get("/images/broken").status_code == 404


def test_an_admin_reaches_a_users_image_by_owner(
    admin: ApiUser, make_user: Callable[..., ApiUser], jq_definition: dict[str, Any]
) -> None:
    alice, bob = make_user(), make_user()
    r = _builds(alice, {**jq_definition, "name": "hers"})
    assert r.status_code == 201, r.text
    assert admin.http.get("/images/hers").status_code == 404  # not global: not listed
    by_name = admin.http.get("/images/hers", params={"owner": alice.user.name})
    assert by_name.status_code == 200 and by_name.json() == r.json()
    refused = bob.http.delete("/images/hers", params={"owner": alice.user.id})
    assert refused.status_code == 403 and "only an admin" in refused.json()["error"]
    missing = admin.http.get("/images/hers", params={"owner": "nobody-at-all"})
    assert missing.status_code == 404 and "user 'nobody-at-all'" in missing.json()["error"]
    assert admin.http.delete("/images/hers", params={"owner": alice.user.id}).status_code == 204
    assert alice.http.get("/images/hers").status_code == 404
    assert _image_files(r.json()["ref"]) == []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_client_that_leaves_stops_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A build that takes as long as the test wants (the real child-process path and
    # image cache, a private one here), streamed to a client that goes away.
    monkeypatch.setenv(BUILDER_ENV, f"{sys.executable} {SLOW_BUILDER}")
    monkeypatch.setenv("SLOW_BUILD_S", "600")
    images = tmp_path / "images"
    server = LiveServer(tmp_path / "srv", config_overrides={"image_dir": images}).start()
    try:
        _, key = server.store.create_user("leaver")
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/x-ndjson"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
            body = {"name": "slow", "packages": ["jq"]}
            with c.stream("POST", "/images", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    found = re.search(r"process group (\d+)", json.loads(line)["message"])
                    if found:
                        break
            assert found is not None
            pgid = int(found[1])
            deadline = time.monotonic() + 30
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _group_alive(pgid), "the build's processes outlived its client"
            assert c.get("/images/slow").status_code == 404
        assert list((images / DEFS_DIR).iterdir()) == []  # nothing registered stays
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("body", "status", "complaint"),
    [
        ({"dockerfile": "FROM ubuntu\n"}, 422, "only FROM minimal"),
        ({"dockerfile": "FROM minimal\n", "context": "not base64!"}, 422, "context: not base64"),
        ({"packages": ["jq"], "context": ""}, 422, "only a Dockerfile image has a build context"),
        ({"dockerfile": "FROM minimal\n", "env": {"A": "1"}}, 422, "its ENV"),
        ({"dockerfile": "FROM minimal\n", "packages": ["jq"]}, 422, "no packages or files"),
        ({"dockerfile": "FROM minimal\n", "context": "AAAA"}, 422, "not a tar"),
        # A good request, to a daemon whose engine is not Docker.
        ({"dockerfile": "FROM minimal\nRUN true\n"}, 503, "needs the docker engine"),
    ],
)
def test_dockerfile_requests_that_cannot_be_built(
    admin: ApiUser, body: dict[str, Any], status: int, complaint: str
) -> None:
    r = _builds(admin, {"name": "df", **body})
    assert r.status_code == status, r.text
    assert complaint in r.json()["error"], r.text
    assert admin.http.get("/images/df").status_code == 404
