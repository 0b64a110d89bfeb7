"""The warm pool through a real ``kiln serve``: its warm-up fills the pool, a create
through the API takes a member, members are in no listing, and the daemon's
shutdown destroys the members but not the sandboxes (the engine-level tests of
claim, refill, fallback and isolation are in tests/engine/test_pool.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.engine.qemu.process import find_processes

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host
from .serve import Serve, client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(600)]

READY = re.compile(r"warm pool: member (pool-[0-9a-f]+) ready")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with daemon_host(
        tmp_path_factory.mktemp("pool"),
        "kiln-pl",
        vm=Bridge("kplb0", "10.213.47.0/24"),
        extra={"pool": {"size": 1, "memory_mb": 1024}},
    ) as host:
        yield host


def ready_members(serve: Serve, timeout: float = 240) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (found := READY.findall(serve.output())):
        assert time.monotonic() < deadline, serve.output()[-3000:]
        time.sleep(0.2)
    return found


def live(directory: Path) -> bool:
    return bool(find_processes(f"{directory}/"))


def test_the_daemon_keeps_a_pool_and_destroys_it_on_shutdown(setup: Host) -> None:
    sandboxes = setup.data / "qemu" / "sandboxes"
    serve = setup.serve()
    try:
        (member,) = ready_members(serve)
        assert live(sandboxes / member)
        with client(serve, setup.data) as c:
            assert c.get("/sandboxes").json() == []  # a member is nobody's sandbox
            r = c.post("/sandboxes", json={"name": "alice", "env": {"WHO": "alice"}})
            assert r.status_code == 201, r.text
            assert exec_ok(c, "alice", "sh", "-c", "echo $WHO; hostname") == "alice\nalice\n"
            # The member's machine is alice's now: its record names her.
            record = json.loads((sandboxes / member / "sandbox.json").read_text())
            assert record["spec"]["name"] == "alice" and record["net_id"] == member
            assert [s["name"] for s in c.get("/sandboxes").json()] == ["alice"]
            # The refill makes the next member.
            deadline = time.monotonic() + 240
            while len(ready_members(serve)) < 2:
                assert time.monotonic() < deadline, serve.output()[-3000:]
                time.sleep(0.2)
        second = ready_members(serve)[1]
    finally:
        assert serve.stop() == 0
    assert live(sandboxes / member), "alice's sandbox outlives the daemon"
    assert not live(sandboxes / second) and not (sandboxes / second).exists()
