"""The relay between real daemons: ``serve()`` in subprocesses (the agent engine), each
a node that registered itself on the run's PostgreSQL server; requests to node a
for a sandbox on node b, then b killed (-9): 502 while its lease runs, 503 once lost."""

from __future__ import annotations

import json
import signal
import time

from .cluster_harness import LEASE_S, Cluster


def test_node_a_serves_a_sandbox_of_node_b_until_b_is_gone(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    key = cluster.key()
    with a.client(key) as ca, b.client(key) as cb:
        # Placed on b: a takes no new sandboxes while it drains.
        assert ca.post("/nodes/a/drain").status_code == 200
        made = cb.post("/sandboxes", json={"name": "far"})
        assert ca.post("/nodes/a/undrain").status_code == 200
        assert made.status_code == 201, made.text
        sb = made.json()
        assert sb["node"] == "b"

        got = ca.get("/sandboxes/far")
        assert got.status_code == 200, got.text
        assert (got.json()["id"], got.headers["x-kiln-node"]) == (sb["id"], "b")
        out = ca.post("/sandboxes/far/exec", json={"cmd": ["sh", "-c", "echo hi > f; cat f"]})
        assert out.status_code == 200, out.text
        assert out.json()["stdout"] == "hi\n"
        with ca.stream(
            "POST",
            f"/sandboxes/{sb['id']}/exec",
            json={"cmd": ["sh", "-c", "echo one; echo two"]},
            headers={"Accept": "application/x-ndjson"},
        ) as r:
            events = [json.loads(line) for line in r.iter_lines() if line]
        assert "".join(e.get("data", "") for e in events) == "one\ntwo\n"
        assert events[-1]["type"] == "exit"
        put = ca.put("/sandboxes/far/files", params={"path": "blob"}, content=b"x" * 100_000)
        assert put.status_code in (200, 201, 204), put.text
        assert ca.get("/sandboxes/far/files", params={"path": "blob"}).content == b"x" * 100_000

        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()  # its lease still runs (renewed every LEASE_S / 3)
        r = ca.get("/sandboxes/far")
        assert r.status_code == 502, r.text
        assert r.json()["error"].startswith("node 'b' (127.0.0.1:")
        assert "cannot be reached" in r.json()["error"]
        time.sleep(LEASE_S + 1.1)  # b's lease runs out, and a's cache of node rows
        r = ca.post("/sandboxes/far/exec", json={"cmd": ["true"]})
        assert r.status_code == 503, r.text
        assert r.json()["error"].startswith(
            f"sandbox {sb['id']} lives on node 'b', which is lost (no lease since "
        )
        # The list still shows it, from the shared store.
        assert [s["node"] for s in ca.get("/sandboxes").json()] == ["b"]
