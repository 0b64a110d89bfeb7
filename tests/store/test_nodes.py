"""Cluster nodes in the store, on both backends: registration, leases, drain, and which
node a sandbox lives on."""

from __future__ import annotations

import pytest

from kiln.store import Conflict, InvalidValue, NodeState, NotFound, Store, User

from .conftest import Ticker


def register(store: Store, name: str = "node-a", **changes: object) -> object:
    fields: dict[str, object] = {
        "address": f"http://{name}:8080",
        "engines": ("qemu", "docker/runc"),
        "cpus": 8,
        "memory_mb": 16384,
        "disk_mb": 100_000,
        "lease_s": 10.0,
        **changes,
    }
    return store.register_node(name, **fields)  # type: ignore[arg-type]


def test_a_node_registers_renews_and_is_lost_when_its_lease_runs_out(
    store: Store, ticker: Ticker
) -> None:
    node = store.register_node(
        "node-a",
        address="http://10.0.0.1:8080",
        engines=("qemu", "docker/runc"),
        cpus=8,
        memory_mb=16384,
        disk_mb=100_000,
        lease_s=10.0,
        load=0.5,
    )
    assert (node.name, node.address, node.engines) == (
        "node-a",
        "http://10.0.0.1:8080",
        ("qemu", "docker/runc"),
    )
    assert (node.cpus, node.memory_mb, node.disk_mb, node.load) == (8, 16384, 100_000, 0.5)
    assert node.state is NodeState.ACTIVE and node.starting == 0
    assert node.status(ticker.t) == "active"
    assert node.status(node.lease_until + 0.1) == "lost"
    renewed = store.renew_node("node-a", lease_s=30.0, load=2.25)
    assert renewed.lease_until > node.lease_until + 19 and renewed.load == 2.25
    assert store.renew_node("node-a", lease_s=30.0).load == 2.25  # load kept when not given
    assert [n.name for n in store.list_nodes()] == ["node-a"]
    assert store.get_node("node-a") == store.list_nodes()[0]
    with pytest.raises(NotFound):
        store.renew_node("node-b", lease_s=10.0)
    with pytest.raises(NotFound):
        store.get_node("node-b")


def test_registering_again_takes_the_row_over_and_keeps_a_drain(store: Store) -> None:
    register(store, "node-a")
    register(store, "node-b")
    assert store.set_node_state("node-a", NodeState.DRAINING).state is NodeState.DRAINING
    again = store.register_node(
        "node-a",
        address="http://10.0.0.9:9090",
        engines=("docker/runsc",),
        cpus=2,
        memory_mb=2048,
        disk_mb=10,
        lease_s=5.0,
    )
    assert (again.address, again.engines, again.cpus) == (
        "http://10.0.0.9:9090",
        ("docker/runsc",),
        2,
    )
    assert again.state is NodeState.DRAINING, "a restart must not undo an admin's drain"
    assert [n.name for n in store.list_nodes()] == ["node-a", "node-b"]
    assert store.set_node_state("node-a", NodeState.ACTIVE).state is NodeState.ACTIVE
    with pytest.raises(NotFound):
        store.set_node_state("node-c", NodeState.DRAINING)
    with pytest.raises(ValueError):
        store.set_node_state("node-a", "asleep")  # type: ignore[arg-type]


def test_bad_node_values_are_refused(store: Store) -> None:
    with pytest.raises(InvalidValue):
        register(store, "")
    with pytest.raises(InvalidValue):
        register(store, "node-a", address="")
    with pytest.raises(InvalidValue):
        register(store, "node-a", cpus=-1)
    with pytest.raises(InvalidValue):
        register(store, "node-a", cpus="eight")
    assert store.list_nodes() == []


def test_sandboxes_live_on_a_node_and_move(store: Store, alice: User) -> None:
    register(store, "node-a")
    register(store, "node-b")
    here = store.create_sandbox(alice.id, image="minimal", engine="qemu", name="here")
    on_a = store.create_sandbox(alice.id, image="minimal", engine="qemu", name="a", node="node-a")
    on_b = store.create_sandbox(alice.id, image="minimal", engine="docker", name="b", node="node-b")
    assert (here.node, on_a.node, on_b.node) == (None, "node-a", "node-b")
    assert store.find_sandbox(alice.id, "a").node == "node-a"

    def names(**kwargs: object) -> list[str]:
        return [s.name for s in store.list_live_sandboxes(**kwargs)]  # type: ignore[arg-type]

    assert names() == ["here", "a", "b"]
    assert names(node="node-a") == ["a"]
    assert names(node=None) == ["here"]
    assert names(engine="qemu", node="node-b") == []
    assert store.set_sandbox_node(on_a.id, "node-b").node == "node-b"
    assert names(node="node-b") == ["a", "b"]
    # A node with sandboxes on it stays; once they are gone it may be forgotten.
    with pytest.raises(Conflict):
        store.delete_node("node-b")
    store.delete_sandbox(on_a.id)
    store.delete_sandbox(on_b.id)
    store.delete_node("node-b")
    assert [n.name for n in store.list_nodes()] == ["node-a"]
    with pytest.raises(NotFound):
        store.delete_node("node-b")
    with pytest.raises(NotFound):
        store.set_sandbox_node(on_a.id, "node-a")  # deleted: not live


def test_a_lost_nodes_sandbox_is_claimed_once_and_only_when_lost(
    store: Store, alice: User, ticker: Ticker
) -> None:
    register(store, "node-b", lease_s=5.0)
    register(store, "node-c", lease_s=1000.0)
    sb = store.create_sandbox(alice.id, image="minimal", engine="qemu", name="s", node="node-b")
    # node-b's lease still runs: nobody takes its sandbox.
    assert store.claim_sandbox(sb.id, from_node="node-b", to_node="node-c") is None
    assert store.get_sandbox(sb.id).node == "node-b"
    ticker.t += 10  # its lease ran out: node-b is lost
    moved = store.claim_sandbox(sb.id, from_node="node-b", to_node="node-c")
    assert moved is not None and moved.node == "node-c" and moved.id == sb.id
    # Once: a second claimer (or the same one again) finds it no longer node-b's.
    assert store.claim_sandbox(sb.id, from_node="node-b", to_node="node-a") is None
    assert store.get_sandbox(sb.id).node == "node-c"
    # A drain moves a live node's sandbox (lost_only=False), still only from its node.
    assert store.claim_sandbox(sb.id, from_node="node-b", to_node="x", lost_only=False) is None
    back = store.claim_sandbox(sb.id, from_node="node-c", to_node="node-b", lost_only=False)
    assert back is not None and back.node == "node-b"
    store.delete_sandbox(sb.id)
    assert store.claim_sandbox(sb.id, from_node="node-b", to_node="node-c") is None
