"""``/nodes`` and ``kiln node``: real daemons on a real PostgreSQL store, the real CLI
in subprocesses; and a single daemon on SQLite, which has no nodes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kiln.sdk import AsyncKiln, NodeInfo
from kiln.sdk.errors import Conflict, NotFound
from kiln.store import Store

from .cluster_harness import Cluster
from .harness import LiveServer, kill_recorded_agents
from .test_daemon import SRC


def kiln(url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC), "KILN_URL": url, "KILN_TOKEN": token},
        timeout=60,
        check=False,
    )


def test_admins_see_drain_and_remove_nodes(cluster: Cluster) -> None:
    # a has too little memory for the sandbox below: placement puts it on b.
    a = cluster.start("a", "--set", "cluster.cpus=4", "--set", "cluster.memory_mb=512")
    b = cluster.start("b", "--set", "cluster.cpus=2", "--set", "cluster.memory_mb=2048")
    key = cluster.key()
    with a.client(key) as ca:
        made = ca.post("/sandboxes", json={"name": "on-b", "cpus": 2, "memory_mb": 1024})
        assert made.status_code == 201 and made.json()["node"] == "b", made.text
    with a.client(key) as ca:
        listed = {n["name"]: n for n in ca.get("/nodes").json()}
        assert set(listed) == {"a", "b"}
        nb = listed["b"]
        assert (nb["address"], nb["engines"], nb["status"], nb["state"]) == (
            b.url,
            ["fake"],
            "active",
            "active",
        )
        assert (nb["cpus"], nb["memory_mb"], nb["sandboxes"]) == (2, 2048, 1)
        assert (nb["cpus_allocated"], nb["memory_allocated_mb"]) == (2, 1024)
        assert 0 < nb["lease_left_s"] <= 1.5 and nb["disk_mb"] > 0
        assert listed["a"]["sandboxes"] == 0
        one = ca.get("/nodes/b").json()
        assert {k: v for k, v in one.items() if k not in ("lease_left_s", "load")} == {
            k: v for k, v in nb.items() if k not in ("lease_left_s", "load")
        }
        missing = ca.get("/nodes/nowhere")
        assert missing.status_code == 404 and "nowhere" in missing.json()["error"]

    # The CLI, against node a, about node b.
    out = kiln(a.url, key, "node", "drain", "b")
    assert out.returncode == 0 and out.stdout.strip() == "node b draining", out.stderr
    table = kiln(a.url, key, "node", "ls")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[2:] if line.strip()}
    assert rows["b"][1] == "draining" and rows["a"][1] == "active"
    assert rows["b"][4:7] == ["1", "2/2", "1G/2G"]
    refused = kiln(a.url, key, "node", "rm", "b")
    assert refused.returncode != 0
    assert "node 'b' still has 1 live sandbox(es)" in refused.stderr
    assert "Traceback" not in refused.stderr
    undrained = json.loads(kiln(a.url, key, "node", "undrain", "b", "--json").stdout)
    assert undrained["state"] == "active"

    with b.client(key) as cb:
        assert cb.delete("/sandboxes/on-b").status_code == 204
    assert b.signal(signal.SIGTERM) == 0
    gone = kiln(a.url, key, "node", "rm", "b")
    assert gone.returncode == 0 and gone.stdout.strip() == "node b removed", gone.stderr
    with Store.open(cluster.pg_url) as store:
        assert [n.name for n in store.list_nodes()] == ["a"]


def test_only_admins_may_see_nodes(cluster: Cluster) -> None:
    a = cluster.start("a")
    with Store.open(cluster.pg_url) as store:
        _, user_key = store.create_user("bob")
    with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {user_key}"}) as c:
        for method, path in (
            ("GET", "/nodes"),
            ("GET", "/nodes/a"),
            ("POST", "/nodes/a/drain"),
            ("POST", "/nodes/a/undrain"),
            ("DELETE", "/nodes/a"),
        ):
            r = c.request(method, path)
            assert r.status_code == 403, (method, path, r.text)
            assert "only an admin" in r.json()["error"]
    out = kiln(a.url, user_key, "node", "ls")
    assert out.returncode != 0 and "only an admin" in out.stderr


def test_a_single_daemon_has_no_nodes(tmp_path: Path) -> None:
    live = LiveServer(tmp_path).start()
    _, key = live.store.create_user("root", admin=True)
    try:
        with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/nodes").json() == []
            for method, path in (
                ("GET", "/nodes/x"),
                ("POST", "/nodes/x/drain"),
                ("DELETE", "/nodes/x"),
            ):
                r = c.request(method, path)
                assert r.status_code == 404
                assert "this daemon is not a cluster (its store is SQLite)" in r.json()["error"]
            made = c.post("/sandboxes", json={"name": "solo"})
            assert made.status_code == 201 and made.json()["node"] is None
        out = kiln(live.url, key, "node", "ls", "--json")
        assert out.returncode == 0 and json.loads(out.stdout) == []
    finally:
        live.stop()
        kill_recorded_agents(live.root / "engine")


def test_the_async_sdk_manages_nodes(cluster: Cluster) -> None:
    a = cluster.start("a")
    cluster.start("b")
    key = cluster.key()

    async def scenario() -> None:
        async with AsyncKiln(a.url, key) as k:
            nodes = await k.nodes.list()
            assert [n.name for n in nodes] == ["a", "b"]
            assert all(isinstance(n, NodeInfo) and n.status == "active" for n in nodes)
            assert (await k.nodes.drain("b")).state == "draining"
            assert (await k.nodes.get("b")).status == "draining"
            assert (await k.nodes.undrain("b")).status == "active"
            made = await k.sandboxes.create(name="s")
            assert made.node in ("a", "b")
            with pytest.raises(Conflict, match="still has 1 live sandbox"):
                await k.nodes.delete(made.node)
            with pytest.raises(NotFound):
                await k.nodes.get("nowhere")

    asyncio.run(scenario())
