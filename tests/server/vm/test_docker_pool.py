"""The Docker engine's warm pool through a real ``kiln serve`` (Docker the default
engine): its warm-up fills the pool, a create through the API takes the member,
members are in no listing, and the daemon's shutdown removes the members but not
the sandboxes (claim, refill, fallback and isolation at the engine level are in
tests/engine/docker/test_pool.py)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator

import pytest

from kiln.engine.docker.daemon import sdk_client
from kiln.engine.docker.record import LABEL, container_name

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host
from .serve import Serve, client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(600)]

READY = re.compile(r"docker warm pool: member (pool-[0-9a-f]+) ready")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with daemon_host(
        tmp_path_factory.mktemp("dpool"),
        "kiln-dp",
        vm=Bridge("kdpq0", "10.213.52.0/24"),
        docker=Bridge("kdpd0", "10.213.53.0/24"),
        extra={"engine": "docker", "pool": {"size": 1, "memory_mb": 1024}},
    ) as host:
        yield host


def ready_members(serve: Serve, count: int = 1, timeout: float = 180) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := READY.findall(serve.output())) < count:
        assert time.monotonic() < deadline, serve.output()[-3000:]
        time.sleep(0.1)
    return found


def test_the_daemon_keeps_a_docker_pool_and_removes_it_on_shutdown(setup: Host) -> None:
    sandboxes = setup.data / "docker-engine" / "sandboxes"
    serve = setup.serve()
    try:
        (member,) = ready_members(serve)
        with client(serve, setup.data) as c:
            assert c.get("/sandboxes").json() == []  # a member is nobody's sandbox
            r = c.post("/sandboxes", json={"name": "alice", "env": {"WHO": "alice"}})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            assert r.json()["engine"] == "docker"
            out = exec_ok(c, "alice", "sh", "-c", "echo $WHO; hostname; cat /etc/hostname")
            assert out == "alice\nalice\nalice\n"
            # The member's container is alice's now: her record names it.
            record = json.loads((sandboxes / sid / "record.json").read_text())
            assert record["spec"]["name"] == "alice" and record["member"] == member
            assert [s["name"] for s in c.get("/sandboxes").json()] == ["alice"]
            second = ready_members(serve, 2)[1]  # the refill
    finally:
        assert serve.stop() == 0
    with contextlib.closing(sdk_client(setup.dockerd.url)) as docker:
        kept = docker.containers.list(all=True, filters={"name": f"^{container_name(sid)}$"})
        assert [c.status for c in kept] == ["running"], "alice's sandbox outlives the daemon"
        assert not docker.containers.list(all=True, filters={"label": f"{LABEL}={second}"})
    assert not (sandboxes / second).exists()
