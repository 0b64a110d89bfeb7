"""Creates placed across real daemons (nodes on one real PostgreSQL store): spread by
capacity, never over it when two nodes place at once, around a node that refuses, and
never on a draining node."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

from kiln.cluster import PEER_HEADER, PeerAuth
from kiln.store import Store

from .cluster_harness import Cluster
from .test_daemon import Daemon


def offer(cpus: int, memory_mb: int) -> tuple[str, ...]:
    return ("--set", f"cluster.cpus={cpus}", "--set", f"cluster.memory_mb={memory_mb}")


def create(daemon: Daemon, key: str, **body: object) -> httpx.Response:
    with daemon.client(key) as c:
        return c.post("/sandboxes", json=body, timeout=120)


def test_thirty_creates_through_one_node_spread_by_capacity(cluster: Cluster) -> None:
    a = cluster.start("a", *offer(2, 1280))  # room for 5 of 256 MB
    cluster.start("b", *offer(3, 2560))  # 10
    cluster.start("c", *offer(5, 5120))  # 20
    key = cluster.key()
    placed: Counter[str] = Counter()
    for n in range(30):
        made = create(a, key, name=f"s{n}", memory_mb=256)
        assert made.status_code == 201, made.text
        placed[made.json()["node"]] += 1
    assert sum(placed.values()) == 30
    assert placed["c"] > placed["b"] > placed["a"] > 0, placed
    # Every node's share of its memory within one step of the others'.
    shares = [placed["a"] / 5, placed["b"] / 10, placed["c"] / 20]
    assert max(shares) - min(shares) <= 0.26, placed
    with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {key}"}) as c:
        listed = {s["name"]: s["node"] for s in c.get("/sandboxes").json()}
        assert Counter(listed.values()) == placed
        nodes = {n["name"]: n for n in c.get("/nodes").json()}
    assert {n: nodes[n]["sandboxes"] for n in "abc"} == dict(placed)
    assert all(n["starting"] == 0 for n in nodes.values())  # every reservation released
    # More than any node has left: refused with a clear 507.
    full = create(a, key, name="too-big", memory_mb=2048)
    assert full.status_code == 507, full.text
    assert "no node has room for 1 CPU(s) and 2048 MB" in full.json()["error"]


def test_two_nodes_placing_at_once_never_overcommit(cluster: Cluster) -> None:
    daemons = [cluster.start(name, *offer(8, 1536)) for name in ("a", "b", "c")]  # 3 each
    key = cluster.key()
    answers: list[int] = []
    lock = threading.Lock()

    def hammer(daemon: Daemon, worker: int) -> None:
        with daemon.client(key) as c:
            for n in range(4):
                while True:
                    r = c.post(
                        "/sandboxes", json={"name": f"w{worker}-{n}", "memory_mb": 512}, timeout=120
                    )
                    if r.status_code != 503:  # busy starting: ask again
                        break
                    time.sleep(0.1)
                with lock:
                    answers.append(r.status_code)

    threads = [
        threading.Thread(target=hammer, args=(daemons[w % 2], w)) for w in range(6)
    ]  # through a and b
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(answers) == {201: 9, 507: 24 - 9}
    with Store.open(cluster.pg_url) as store:
        usage = store.node_usage()
        assert {n: u.memory_mb for n, u in usage.items()} == {"a": 1536, "b": 1536, "c": 1536}
        assert all(n.starting == 0 and n.starting_memory_mb == 0 for n in store.list_nodes())


def test_a_refusing_node_is_passed_over_and_a_draining_one_gets_nothing(
    cluster: Cluster,
) -> None:
    a = cluster.start("a", *offer(2, 2048))
    cluster.start("b", *offer(2, 2048))
    key = cluster.key()
    with Store.open(cluster.pg_url) as store:
        # A node that looks best (empty, huge) but does not answer at all.
        store.register_node(
            "ghost",
            address="http://127.0.0.1:9",
            engines=("fake",),
            cpus=512,
            memory_mb=1 << 20,
            disk_mb=1,
            lease_s=600,
        )
        for n in range(4):
            made = create(a, key, name=f"r{n}", memory_mb=256)
            assert made.status_code == 201, made.text
            assert made.json()["node"] in ("a", "b")
        assert store.get_node("ghost").starting == 0  # its reservations given back
        with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.post("/nodes/b/drain").json()["status"] == "draining"
            assert c.delete("/nodes/ghost").status_code == 204
        for n in range(3):
            made = create(a, key, name=f"d{n}", memory_mb=256)
            assert made.status_code == 201 and made.json()["node"] == "a", made.text
    # The caller's errors come back from the chosen node as they are.
    taken = create(a, key, name="d0")
    assert taken.status_code == 409 and "already exists" in taken.json()["error"]


def test_a_peer_signed_create_is_made_where_it_arrives(cluster: Cluster) -> None:
    a = cluster.start("a", *offer(2, 2048))
    cluster.start("b", *offer(64, 65536))  # placement would pick b
    key = cluster.key()
    peer = PeerAuth.load("b", cluster.root / "cluster-secret", create=False)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=a.url, headers=auth) as c:
        signed = {PEER_HEADER: peer.sign("POST", "/sandboxes")}
        made = c.post("/sandboxes", json={"name": "here"}, headers=signed)
        assert made.status_code == 201 and made.json()["node"] == "a", made.text
        forged = c.post("/sandboxes", json={"name": "x"}, headers={PEER_HEADER: "b:1:00"})
        assert forged.status_code == 401 and "peer signature" in forged.json()["error"]
        stale = {PEER_HEADER: peer.sign("POST", "/sandboxes", now=time.time() - 3600)}
        assert c.post("/sandboxes", json={"name": "x"}, headers=stale).status_code == 401
        # Without the caller's key the peer's signature alone creates nothing.
        anon = httpx.post(f"{a.url}/sandboxes", json={"name": "x"}, headers=signed)
        assert anon.status_code == 401
