"""A Dockerfile image in both engines: ``kiln serve`` (the real CLI) builds it through
``POST /images`` with its daemon's private dockerd (FROM kiln's own ``minimal``,
imported into it), and runs it as a QEMU microVM and as a Docker container.

The Dockerfile (``tests/images/data/dockerfile``) uses COPY, RUN, ENV, WORKDIR and
USER and needs no network. Its tree is keyed by the Dockerfile and its context in
the shared image cache, so a second run only redoes dockerd's (cached) steps and
the import of ``minimal`` into this test's fresh dockerd.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host
from .serve import client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(600)]

DATA = Path(__file__).parents[2] / "images" / "data" / "dockerfile"


def context_of(directory: Path) -> str:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with daemon_host(
        tmp_path_factory.mktemp("dockerfile"),
        "kiln-dfi",
        vm=Bridge("kdfiq0", "10.213.83.0/24"),
        docker=Bridge("kdfid0", "10.213.84.0/24"),
    ) as host:
        yield host


def test_a_dockerfile_image_runs_in_both_engines_and_a_failed_step_is_named(
    setup: Host,
) -> None:
    body = {
        "name": "kiln-test-df",
        "dockerfile": (DATA / "Dockerfile").read_text(),
        "context": context_of(DATA),
    }
    serve = setup.serve()
    try:
        with client(serve, setup.data) as c:
            # Streamed: the Dockerfile's steps are in the progress.
            lines = []
            with c.stream(
                "POST", "/images", json=body, headers={"Accept": "application/x-ndjson"}
            ) as r:
                assert r.status_code == 200
                lines = [json.loads(line) for line in r.iter_lines() if line]
            assert lines[-1]["type"] == "image", lines[-1]
            messages = [e["message"] for e in lines[:-1]]
            assert any("Step 4/7 : COPY hello.txt ./hello.txt" in m for m in messages)
            image = lines[-1]["image"]
            assert (image["kind"], image["scope"]) == ("dockerfile", "global")
            assert image["env"] == {
                "GREETING": "hello from a Dockerfile",
                "KILN_TEST_DOCKERFILE": "1",
            }
            for engine in ("qemu", "docker"):
                r = c.post(
                    "/sandboxes", json={"name": engine, "engine": engine, "image": image["name"]}
                )
                assert r.status_code == 201, r.text
                assert r.json()["image"] == image["ref"]
                # COPY, RUN (as root and as USER builder), ENV, USER, WORKDIR.
                out = exec_ok(
                    c,
                    engine,
                    "sh",
                    "-c",
                    "cat /opt/app/hello.txt /opt/app/run-output /home/builder/whoami;"
                    " echo $GREETING; id -un; pwd",
                )
                assert out == (
                    "copied from the context\nbuilt by RUN\nbuilder\n"
                    "hello from a Dockerfile\nbuilder\n/opt/app\n"
                )
                # Root on request, as in every sandbox.
                r = c.post(f"/sandboxes/{engine}/exec", json={"cmd": ["id", "-un"], "user": "root"})
                assert r.status_code == 200, r.text
                assert r.json()["stdout"] == "root\n", r.text
                assert c.delete(f"/sandboxes/{engine}").status_code == 204

            failing = {
                "name": "kiln-test-df-fails",
                "dockerfile": "FROM minimal\nRUN echo about to fail && false\nRUN true\n",
            }
            r = c.post("/images", json=failing)
            assert r.status_code == 422, r.text
            message = r.json()["error"]
            assert "step 2/3 RUN echo about to fail && false: exit code 1" in message
            log = Path(message.split("build log: ")[1].strip())
            assert "about to fail" in log.read_text()
            assert c.get("/images/kiln-test-df-fails").status_code == 404

            r = c.post("/images", json={"name": "elsewhere", "dockerfile": "FROM debian\n"})
            assert r.status_code == 422 and "only FROM minimal" in r.text, r.text
            assert c.delete(f"/images/{image['name']}").status_code == 204
    finally:
        serve.stop()
