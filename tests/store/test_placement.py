"""Placement's store transaction (``reserve_node``/``release_node``) with the policy of
:mod:`kiln.cluster.placement`, on both backends; and two stores placing at once on one
PostgreSQL database never overcommitting a node."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from kiln.cluster.placement import MAX_STARTING, NoCapacity, NodesBusy, Placer, Shape
from kiln.store import NodeState, Store, User

from .conftest import Ticker

SMALL = Shape(engine="qemu", cpus=1, memory_mb=512)


def node(store: Store, name: str, *, cpus: int = 4, memory_mb: int = 2048, **extra: object) -> None:
    fields: dict[str, object] = {
        "address": f"http://{name}:8080",
        "engines": ("qemu", "docker", "docker/runc"),
        "cpus": cpus,
        "memory_mb": memory_mb,
        "disk_mb": 10_000,
        "lease_s": 100_000.0,
        **extra,
    }
    store.register_node(name, **fields)  # type: ignore[arg-type]


@pytest.fixture
def owner(store: Store) -> User:
    return store.create_user("owner")[0]


@pytest.fixture
def placer(store: Store, ticker: Ticker) -> Placer:
    return Placer(store, rng=random.Random(7), clock=ticker)


def test_reserving_counts_the_create_until_it_is_released(store: Store, placer: Placer) -> None:
    node(store, "a")
    chosen = placer.reserve(SMALL)
    assert chosen.name == "a"
    assert (chosen.starting, chosen.starting_cpus, chosen.starting_memory_mb) == (1, 1, 512)
    placer.release("a", SMALL)
    after = store.get_node("a")
    assert (after.starting, after.starting_cpus, after.starting_memory_mb) == (0, 0, 0)
    placer.release("a", SMALL)  # once too often: never below zero
    assert store.get_node("a").starting == 0


def test_live_sandboxes_and_reservations_fill_a_node(
    store: Store, owner: User, placer: Placer
) -> None:
    node(store, "a", cpus=1, memory_mb=2048)  # 4 vCPUs with overcommit, 2048 MB
    store.create_sandbox(owner.id, image="minimal", engine="qemu", memory_mb=1024, node="a")
    placer.reserve(Shape(engine="qemu", cpus=1, memory_mb=512))
    with pytest.raises(NoCapacity, match="no node has room for 1 CPU\\(s\\) and 1024 MB"):
        placer.reserve(Shape(engine="qemu", cpus=1, memory_mb=1024))
    placer.reserve(Shape(engine="qemu", cpus=2, memory_mb=512))  # 4 vCPUs now: full
    with pytest.raises(NoCapacity):
        placer.reserve(Shape(engine="qemu", cpus=1, memory_mb=1))
    assert store.node_usage()["a"].memory_mb == 1024


def test_engine_runtime_drain_and_lease_rule_nodes_out(store: Store, placer: Placer) -> None:
    node(store, "vm", engines=("qemu",))
    node(store, "runc", engines=("docker", "docker/runc"))
    assert placer.reserve(Shape(engine="docker", runtime="runc", cpus=1, memory_mb=64)).name == (
        "runc"
    )
    with pytest.raises(NoCapacity, match="no active node runs the docker/runsc engine"):
        placer.reserve(Shape(engine="docker", runtime="runsc", cpus=1, memory_mb=64))
    store.set_node_state("vm", NodeState.DRAINING)
    with pytest.raises(NoCapacity, match="no active node runs the qemu engine"):
        placer.reserve(SMALL)
    store.set_node_state("vm", NodeState.ACTIVE)
    store.renew_node("vm", lease_s=-5)  # lost
    with pytest.raises(NoCapacity):
        placer.reserve(SMALL)
    with pytest.raises(NoCapacity, match="besides runc, which refused"):
        placer.reserve(Shape(engine="docker", cpus=1, memory_mb=64), exclude=("runc",))


def test_a_node_starting_its_share_is_busy(store: Store, placer: Placer) -> None:
    node(store, "a", cpus=64, memory_mb=64_000)
    for _ in range(MAX_STARTING):
        placer.reserve(SMALL)
    with pytest.raises(NodesBusy, match="try again"):
        placer.reserve(SMALL)
    placer.release("a", SMALL)
    assert placer.reserve(SMALL).name == "a"


def test_best_of_two_keeps_the_nodes_evenly_loaded(
    store: Store, owner: User, placer: Placer
) -> None:
    for name, size in (("s", 1), ("m", 2), ("l", 4)):
        node(store, name, cpus=2 * size, memory_mb=2048 * size)
    placed: Counter[str] = Counter()
    for _ in range(28):
        chosen = placer.reserve(SMALL)
        store.create_sandbox(owner.id, image="minimal", engine="qemu", node=chosen.name)
        placer.release(chosen.name, SMALL)
        placed[chosen.name] += 1
    assert sum(placed.values()) == 28
    shares = {n: placed[n] / (4 * size) for n, size in (("s", 1), ("m", 2), ("l", 4))}
    assert placed["l"] > placed["m"] > placed["s"] > 0, placed
    assert max(shares.values()) - min(shares.values()) <= 0.25, placed


def test_two_stores_placing_at_once_never_overcommit_a_node(pg_url: str) -> None:
    with Store.open(pg_url) as setup:
        for name in ("a", "b", "c"):
            node(setup, name, cpus=16, memory_mb=1536)  # room for 3 of 512 MB each
    stores = [Store.open(pg_url), Store.open(pg_url)]
    won: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def hammer(store: Store) -> None:
        placer = Placer(store)
        for _ in range(8):
            try:
                chosen = placer.reserve(SMALL)
            except NoCapacity as exc:
                with lock:
                    refused.append(str(exc))
            else:
                with lock:
                    won.append(chosen.name)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in stores for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        nodes = {n.name: n for n in stores[0].list_nodes()}
    finally:
        for s in stores:
            s.close()
    assert Counter(won) == {"a": 3, "b": 3, "c": 3}
    assert len(refused) == 6 * 8 - 9
    assert all(n.starting_memory_mb == 1536 and n.starting == 3 for n in nodes.values())


def test_a_preferred_node_is_taken_whenever_it_can(store: Store, placer: Placer) -> None:
    node(store, "busy", cpus=4, memory_mb=1024)
    node(store, "empty", cpus=64, memory_mb=65536)
    assert placer.reserve(SMALL, prefer="busy").name == "busy"  # the fuller one, preferred
    placer.reserve(SMALL, prefer="busy")
    # Full now: the others are drawn.
    assert placer.reserve(SMALL, prefer="busy").name == "empty"


def test_reservations_nobody_gave_back_are_forgotten_once_stale(
    store: Store, placer: Placer, ticker: Ticker
) -> None:
    node(store, "a")
    placer.reserve(SMALL)
    placer.reserve(SMALL)
    assert not store.forget_stale_starts("a", older_than_s=100)  # recent: kept
    assert store.get_node("a").starting == 2
    ticker.t += 200
    assert store.forget_stale_starts("a", older_than_s=100)
    after = store.get_node("a")
    assert (after.starting, after.starting_cpus, after.starting_memory_mb) == (0, 0, 0)
    assert not store.forget_stale_starts("a", older_than_s=100)  # nothing left
