"""Three real ``kiln serve`` nodes in three network namespaces on one real PostgreSQL
(:mod:`kiln.testing.cluster`): the wiring every cluster test stands on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from kiln.testing.cluster import HOST_IP, Cluster
from kiln.testing.postgres import PostgresNotInstalled, find_bindir

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    for tool in ("qemu-system-x86_64", "ip", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        find_bindir()
    except PostgresNotInstalled as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def _get_from(netns: str, url: str) -> int:
    """The status of a GET of ``url`` made from inside namespace ``netns``."""
    code = f"import httpx; print(httpx.get({url!r}, timeout=10).status_code)"
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout.strip())


def test_every_node_reaches_every_other_and_the_store(cluster: Cluster) -> None:
    nodes = list(cluster.each())
    assert [n.name for n in nodes] == ["a", "b", "c"]
    for here in nodes:
        for there in nodes:
            assert _get_from(here.netns, f"{there.url}/health") == 200
    assert HOST_IP in cluster.store_url
    # Nothing of the test's namespace leaks into a node's: each has its own links.
    links = subprocess.run(
        ["ip", "-n", nodes[0].netns, "-o", "link", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert cluster.bridge not in links


def test_a_sandbox_made_on_one_node_is_in_the_shared_store_and_directory(
    cluster: Cluster,
) -> None:
    a, b, c = cluster.nodes["a"], cluster.nodes["b"], cluster.nodes["c"]
    box = _make(cluster, "a", "on-a")
    with a.client(cluster.admin_token) as api:
        out = api.post(
            "/sandboxes/on-a/exec",
            json={"cmd": ["sh", "-c", "echo hi > /home/sandbox/f; hostname"]},
        )
        assert out.status_code == 200, out.text
        assert out.json()["stdout"] == "on-a\n"
    for node in (b, c):  # one store: every node knows it by name and id
        with node.client(cluster.admin_token) as api:
            assert api.get("/sandboxes/on-a").json()["id"] == box["id"]
            assert box["id"] in {s["id"] for s in api.get("/sandboxes").json()}
    # Its files are in the shared directory, under its node's name.
    root: Path = cluster.shared_dir / "nodes" / "a" / "sandboxes" / box["id"]
    assert (root / "sandbox.json").is_file() and (root / "rootfs.qcow2").is_file()
    assert any((cluster.shared_dir / "bases").iterdir())
    assert not (a.data_dir / "qemu" / "sandboxes" / box["id"]).exists()


# --- any node answers for any sandbox ---------------------------------------------------

NDJSON = {"Accept": "application/x-ndjson"}


def _make(cluster: Cluster, node: str, name: str) -> dict[str, Any]:
    """A sandbox made on ``node`` (placement would choose by capacity)."""
    made = cluster.create_on(node, cluster.admin_token, {"name": name, "memory_mb": 256})
    assert made.status_code == 201, made.text
    box: dict[str, Any] = made.json()
    assert box["node"] == node
    return box


def _sh(api: httpx.Client, name: str, script: str) -> str:
    r = api.post(f"/sandboxes/{name}/exec", json={"cmd": ["sh", "-c", script]})
    assert r.status_code == 200, r.text
    assert r.json()["exit_code"] == 0, r.json()
    out: str = r.json()["stdout"]
    return out


def test_requests_to_one_node_reach_sandboxes_on_the_others(cluster: Cluster) -> None:
    for name, node in (("on-b", "b"), ("on-c", "c")):
        _make(cluster, node, name)
    a = cluster.nodes["a"]
    with a.client(cluster.admin_token) as api:
        for name, node in (("on-b", "b"), ("on-c", "c")):
            # Buffered exec, answered by the sandbox's own node.
            r = api.post(f"/sandboxes/{name}/exec", json={"cmd": ["hostname"]})
            assert (r.status_code, r.json()["stdout"]) == (200, f"{name}\n"), r.text
            assert r.headers["x-kiln-node"] == node
            # A streamed exec: NDJSON lines, through a.
            with api.stream(
                "POST",
                f"/sandboxes/{name}/exec",
                json={"cmd": ["sh", "-c", "echo one; sleep 0.5; echo two"]},
                headers=NDJSON,
            ) as stream:
                assert stream.status_code == 200
                events = [json.loads(line) for line in stream.iter_lines() if line]
            assert "".join(e.get("data", "") for e in events) == "one\ntwo\n"
            assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0
            # Files both ways.
            blob = os.urandom(1 << 20)
            put = api.put(f"/sandboxes/{name}/files", params={"path": "/tmp/blob"}, content=blob)
            assert put.status_code in (200, 201, 204), put.text
            got = api.get(f"/sandboxes/{name}/files", params={"path": "/tmp/blob"})
            assert got.status_code == 200 and got.content == blob
            # The reverse proxy to a server in the sandbox.
            _sh(api, name, "cd /tmp && (setsid python3 -m http.server 8000 >/dev/null 2>&1 &)")
            deadline = time.monotonic() + 30
            while True:
                page = api.get(f"/sandboxes/{name}/proxy/8000/blob")
                if page.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert page.status_code == 200 and page.content == blob, page.text[:200]
            assert page.headers["x-kiln-node"] == node
        # The shell over a WebSocket, through a.
        url = f"ws://{a.ip}:8080/sandboxes/on-c/ws?token={cluster.admin_token}&cmd=/bin/sh"
        with ws_connect(url, max_size=None) as ws:
            ws.send(b"echo via-$((6*7))-$(hostname)\n")
            seen = b""
            deadline = time.monotonic() + 20
            while b"via-42-on-c" not in seen:
                assert time.monotonic() < deadline, seen
                message = ws.recv(timeout=20)
                seen += message if isinstance(message, bytes) else message.encode()


# --- a lost node; a drain ----------------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.2)


def _node_status(cluster: Cluster, via: str, name: str) -> str:
    with cluster.nodes[via].client(cluster.admin_token) as api:
        status: str = api.get(f"/nodes/{name}").json()["status"]
    return status


def test_a_killed_nodes_sandboxes_come_back_on_another_node(cluster: Cluster) -> None:
    _make(cluster, "c", "cold-c")
    with cluster.nodes["c"].client(cluster.admin_token) as api:
        _sh(api, "cold-c", "echo cold > /home/sandbox/keep.txt")
        stopped = api.post("/sandboxes/cold-c/stop")
        assert stopped.status_code == 200, stopped.text
        _sh(api, "on-c", "echo hot > /home/sandbox/keep.txt && sync")
    cluster.nodes["c"].lose()  # kill -9 of the daemon and its machines: the host is gone
    _wait(lambda: _node_status(cluster, "a", "c") == "lost", 30, "node c's lease running out")

    with cluster.nodes["a"].client(cluster.admin_token) as api:
        # Its next use takes the cold one over, here on a: files intact.
        started = api.post("/sandboxes/cold-c/start")
        assert started.status_code == 200, started.text
        assert _sh(api, "cold-c", "cat /home/sandbox/keep.txt") == "cold\n"
        row = api.get("/sandboxes/cold-c").json()
        assert row["node"] == "a" and row["status"] == "running"
    with cluster.nodes["b"].client(cluster.admin_token) as api:
        # The one that ran when c died boots again on b (the node asked), files kept.
        assert _sh(api, "on-c", "cat /home/sandbox/keep.txt") == "hot\n"
        row = api.get("/sandboxes/on-c").json()
        assert row["node"] == "b"
        assert row["last_boot"]["reason"] == "rebooted"
        # Every node agrees where they live now.
        r = api.post("/sandboxes/cold-c/exec", json={"cmd": ["cat", "/home/sandbox/keep.txt"]})
        assert r.json()["stdout"] == "cold\n" and r.headers["x-kiln-node"] == "a"


def test_a_drain_moves_stopped_sandboxes_and_leaves_running_ones(cluster: Cluster) -> None:
    _make(cluster, "b", "busy-b")
    with cluster.nodes["b"].client(cluster.admin_token) as api:
        _sh(api, "on-b", "echo parked > /home/sandbox/keep.txt")
        assert api.post("/sandboxes/on-b/stop").status_code == 200
    with cluster.nodes["a"].client(cluster.admin_token) as api:
        drained = api.post("/nodes/b/drain")
        assert drained.status_code == 200 and drained.json()["state"] == "draining"

        def moved() -> bool:
            return bool(api.get("/sandboxes/on-b").json()["node"] != "b")

        _wait(moved, 30, "the drain moving on-b")
        row = api.get("/sandboxes/on-b").json()
        assert (row["node"], row["status"]) == ("a", "stopped")  # c is lost: a is the only one
        assert api.get("/sandboxes/busy-b").json()["node"] == "b"  # running: it stays
    with cluster.nodes["b"].client(cluster.admin_token) as api:
        started = api.post("/sandboxes/on-b/start")  # relayed to a, which adopts it
        assert started.status_code == 200, started.text
        assert _sh(api, "on-b", "cat /home/sandbox/keep.txt") == "parked\n"
        assert _sh(api, "busy-b", "echo still") == "still\n"
