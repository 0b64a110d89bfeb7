"""Daemons on one PostgreSQL store are nodes: each registers, renews a lease, and runs
(recovers, cools, reaps) only its own sandboxes. Real daemons (``serve()`` in
subprocesses over the agent engine) on the run's real PostgreSQL server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.store import Store

from .cluster_harness import LEASE_S, Cluster
from .test_daemon import MAIN, SRC, Daemon


def test_daemons_register_renew_and_are_lost_when_gone(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    with Store.open(cluster.pg_url) as store:
        nodes = {n.name: n for n in store.list_nodes()}
        assert set(nodes) == {"a", "b"}
        assert (nodes["a"].address, nodes["b"].address) == (a.url, b.url)
        assert all(
            n.engines == ("fake",) and n.cpus >= 1 and n.memory_mb > 0 for n in nodes.values()
        )
        first = nodes["b"].lease_until
        assert first > time.time()
        time.sleep(LEASE_S)  # renewed every lease_s / 3
        renewed = store.get_node("b")
        assert renewed.lease_until > first and not renewed.lost(time.time())

        b.proc.kill()  # no clean shutdown: the lease just runs out
        b.proc.wait()
        assert store.get_node("b").status(time.time()) == "active"
        time.sleep(LEASE_S + 0.2)
        assert store.get_node("b").status(time.time()) == "lost"
        assert store.get_node("a").status(time.time()) == "active"

        assert a.signal(signal.SIGTERM) == 0  # a clean stop ends the lease at once
        assert store.get_node("a").status(time.time()) == "lost"
    assert "cluster: node a left (lease ended)" in Daemon.log_text(cluster.data("a"))


def test_sandboxes_carry_their_node_and_recovery_keeps_to_its_own(cluster: Cluster) -> None:
    # Offers that make placement predictable: only a has room for on-a; then b is
    # the emptier one for on-b.
    a = cluster.start("a", "--set", "cluster.memory_mb=2048")
    b = cluster.start("b", "--set", "cluster.memory_mb=512")
    key = cluster.key()
    with a.client(key) as ca, b.client(key) as cb:
        on_a = cb.post("/sandboxes", json={"name": "on-a", "memory_mb": 1024})
        on_b = ca.post("/sandboxes", json={"name": "on-b", "memory_mb": 512})
        assert on_a.status_code == on_b.status_code == 201, (on_a.text, on_b.text)
        assert (on_a.json()["node"], on_b.json()["node"]) == ("a", "b")
        # Any node lists every sandbox with its node.
        listed = {s["name"]: s["node"] for s in ca.get("/sandboxes").json()}
        assert listed == {"on-a": "a", "on-b": "b"}
        out = cb.post("/sandboxes/on-b/exec", json={"cmd": ["sh", "-c", "echo hi > f"]})
        assert out.status_code == 200, out.text
    with Store.open(cluster.pg_url) as store:
        before = store.find_sandbox(store.user_by_name("admin").id, "on-b")

    assert a.signal(signal.SIGTERM) == 0
    a = cluster.start("a")  # recovery of a: its own sandbox only
    log = Daemon.log_text(cluster.data("a"))
    assert "recovery: 1 running (0 rebooted), 0 stopped, 0 unknown, 0 failed" in log
    time.sleep(1.5)  # a's thermal manager (tick 0.5 s) and expiry reaper run meanwhile
    with Store.open(cluster.pg_url) as store:
        after = store.find_sandbox(store.user_by_name("admin").id, "on-b")
    assert (after.node, after.status, after.thermal, after.engine_state) == (
        "b",
        before.status,
        before.thermal,
        before.engine_state,
    )
    with b.client(key) as cb:
        out = cb.post("/sandboxes/on-b/exec", json={"cmd": ["cat", "f"]}).json()
        assert out["stdout"] == "hi\n"


def test_a_node_with_another_cluster_secret_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start("a")
    other = tmp_path / "other-secret"
    args = cluster.args("c", "--set", f"cluster.secret_file={other}")
    (tmp_path / "c").mkdir()
    proc = subprocess.run(
        [sys.executable, str(MAIN), str(cluster.data("c")), *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "HOME": str(cluster.home), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert f"the cluster secret {other} is not this cluster's" in proc.stderr
    with Store.open(cluster.pg_url) as store:
        assert [n.name for n in store.list_nodes()] == ["a"]


def test_a_cluster_node_needs_an_address_others_can_reach(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    args = cluster.args("d", "--set", "listen=127.0.0.1:0", "--set", "cluster.advertise=")
    proc = subprocess.run(
        [sys.executable, str(MAIN), str(cluster.data("d")), *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "HOME": str(cluster.home), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "cluster.advertise: other nodes cannot reach 127.0.0.1:0" in proc.stderr


KILN_SERVE = (sys.executable, "-m", "kiln.cli", "serve")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--node", "bad name", "cluster.node: 1-63 letters, digits, '.', '_' or '-'"),
        ("--advertise", "ftp://x", "cluster.advertise: expected http://HOST:PORT"),
    ],
)
def test_kiln_serve_checks_its_cluster_flags(
    tmp_path: Path, pg_url: str, flag: str, value: str, message: str
) -> None:
    proc = subprocess.run(
        [*KILN_SERVE, "--data-dir", str(tmp_path / "d"), "--store", pg_url, flag, value],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert f"kiln: error: {message}" in proc.stderr and "Traceback" not in proc.stderr
