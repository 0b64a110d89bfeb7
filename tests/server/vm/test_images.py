"""A package-list image in both engines: ``kiln serve`` (the real CLI) builds it through
``POST /images`` and runs it as a QEMU microVM and as a Docker container.

The image (``tests/images/data/jq.yaml``: ``jq`` and two files on top of
``minimal``) is built before the suite enters its network namespace
(scripts/test), so the daemon's build here finds it in the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.images.definition import load_yaml_file

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host
from .serve import client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(600)]

JQ_YAML = Path(__file__).parents[2] / "images" / "data" / "jq.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with daemon_host(
        tmp_path_factory.mktemp("images"),
        "kiln-img",
        vm=Bridge("kimgq0", "10.213.81.0/24"),
        docker=Bridge("kimgd0", "10.213.82.0/24"),
    ) as host:
        yield host


def test_a_package_list_image_runs_in_both_engines(setup: Host) -> None:
    definition = load_yaml_file(JQ_YAML).to_json()
    serve = setup.serve()
    try:
        with client(serve, setup.data) as c:
            built = c.post("/images", json=definition)
            assert built.status_code == 201, built.text
            image = built.json()
            assert (image["name"], image["scope"]) == ("kiln-test-jq", "global")
            for engine in ("qemu", "docker"):
                r = c.post(
                    "/sandboxes", json={"name": engine, "engine": engine, "image": image["name"]}
                )
                assert r.status_code == 201, r.text
                assert r.json()["image"] == image["ref"]
                assert exec_ok(c, engine, "jq", "--version").startswith("jq-1.6")
                assert exec_ok(c, engine, "sh", "-c", "echo '{\"a\": 7}' | jq .a") == "7\n"
                # The definition's files, with their modes; the rest is minimal's.
                assert exec_ok(c, engine, "kiln-hello") == "hello from a definition\n"
                # The image's environment, under the request's own.
                assert exec_ok(c, engine, "sh", "-c", "echo $KILN_TEST_IMAGE") == "jq\n"
                assert exec_ok(c, engine, "stat", "-c", "%a %U", "/usr/local/bin/kiln-hello") == (
                    "755 root\n"
                )
                assert exec_ok(c, engine, "sh", "-c", "id -un; pwd; git --version | cut -c1-3") == (
                    "sandbox\n/workspace\ngit\n"
                )
            # Both run it: it cannot go while they do.
            assert c.delete(f"/images/{image['name']}").status_code == 409
            for engine in ("qemu", "docker"):
                assert c.delete(f"/sandboxes/{engine}").status_code == 204
    finally:
        serve.stop()
