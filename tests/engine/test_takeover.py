"""The cluster's takeover and drain moves on real VMs and a real PostgreSQL store:
node ``b`` is lost (its lease runs out), node ``c`` takes its sandboxes over on
their next use -- files intact, a stopped one still stopped -- and a draining
node's stopped sandbox moves to another node and starts there."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from kiln.cluster.placement import Placer
from kiln.cluster.takeover import TakenElsewhere, Takeover, TakeoverRefused
from kiln.engine import SandboxSpec
from kiln.engine.qemu import QemuEngine
from kiln.engine.states import Status, Thermal
from kiln.store import NodeState, Sandbox, Store, User

from .conftest import VMEnv, wait_until
from .test_adoption import node_config, node_engines
from .test_fork import sh

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

LEASE_S = 2.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nodes(vm_env: VMEnv) -> AsyncIterator[dict[str, QemuEngine]]:
    async with node_engines(vm_env) as engines:
        yield engines


@pytest.fixture
def stores(pg_url: str) -> Iterator[dict[str, Store]]:
    """Each node's own store on the one database, as two daemons open it."""
    opened = {node: Store.open(pg_url) for node in ("b", "c")}
    try:
        yield opened
    finally:
        for s in opened.values():
            s.close()


def register(store: Store, node: str, lease_s: float, memory_mb: int = 4096) -> None:
    store.register_node(
        node,
        address=f"http://{node}:8080",
        engines=("qemu",),
        cpus=2,
        memory_mb=memory_mb,
        disk_mb=10_000,
        lease_s=lease_s,
    )


async def make(store: Store, engine: QemuEngine, user: User, name: str, node: str) -> Sandbox:
    """A sandbox as a daemon makes one: its row on ``node``, then its machine, with a
    file written, then cooled (its snapshot taken) and its state stored."""
    row = store.create_sandbox(user.id, image="minimal", engine="qemu", name=name, node=node)
    await engine.create(SandboxSpec(sandbox_id=row.id, name=name, memory_mb=256))
    await sh(await engine.agent(row.id), f"echo {name} > /home/sandbox/mine.txt")
    await engine.stop(row.id)
    return store.update_sandbox(
        row.id,
        thermal=Thermal.COLD,
        ip=engine.info(row.id).ip,
        engine_state=engine.export_state(row.id),
    )


async def test_a_lost_nodes_sandboxes_are_taken_over_on_their_next_use(
    nodes: dict[str, QemuEngine], stores: dict[str, Store]
) -> None:
    b, c = nodes["b"], nodes["c"]
    register(stores["b"], "b", 600.0)
    register(stores["c"], "c", 600.0)
    user = stores["b"].create_user("alice")[0]
    cooled = await make(stores["b"], b, user, "cooled", "b")  # running, cooled by idleness
    stopped = await make(stores["b"], b, user, "stopped", "b")
    stopped = stores["b"].update_sandbox(stopped.id, status=Status.STOPPED)
    takeover = Takeover(stores["c"], c, "c")
    stores["b"].renew_node("b", lease_s=LEASE_S)  # node b's last renewal
    with pytest.raises(TakeoverRefused, match="alive"):
        await takeover.take_over(stores["c"].get_sandbox(cooled.id))
    await b.close()  # node b dies; nothing renews its lease
    await wait_until(lambda: stores["c"].get_node("b").lost(time.time()), timeout=10)
    # A node without room does not take it: placement sends it where there is room.
    register(stores["c"], "c", 600.0, memory_mb=128)
    register(stores["c"], "d", 600.0)
    with pytest.raises(TakenElsewhere) as elsewhere:
        await takeover.take_over(stores["c"].get_sandbox(cooled.id))
    assert (elsewhere.value.node, elsewhere.value.placed) == ("d", True)
    with pytest.raises(TakeoverRefused, match="no room"):
        await takeover.take_over(stores["c"].get_sandbox(cooled.id), elsewhere=False)
    assert stores["c"].get_sandbox(cooled.id).node == "b"  # nothing moved
    stores["c"].delete_node("d")
    register(stores["c"], "c", 600.0)

    row = await takeover.take_over(stores["c"].get_sandbox(cooled.id))

    assert (row.node, row.status, row.thermal) == ("c", Status.RUNNING, Thermal.HOT)
    assert row.ip == c.info(row.id).ip and row.ip != cooled.ip
    assert await sh(await c.agent(row.id), "cat /home/sandbox/mine.txt") == "cooled\n"
    assert row.engine_state is not None and row.engine_state["record"]["ip"] == row.ip
    again = await takeover.take_over(row)  # a second request: nothing more to do
    assert again.node == "c"

    row = await takeover.take_over(stores["c"].get_sandbox(stopped.id))
    assert (row.node, row.status, row.thermal) == ("c", Status.STOPPED, Thermal.COLD)
    await c.start(row.id)
    assert await sh(await c.agent(row.id), "cat /home/sandbox/mine.txt") == "stopped\n"


async def test_a_drain_moves_stopped_sandboxes_and_leaves_running_ones(
    vm_env: VMEnv, nodes: dict[str, QemuEngine], stores: dict[str, Store]
) -> None:
    c = nodes["c"]
    b = nodes["b"] = QemuEngine(node_config(vm_env, "b"))  # node b is back
    register(stores["b"], "b", 600.0)
    register(stores["c"], "c", 600.0)
    user = stores["c"].create_user("bob")[0]
    parked = await make(stores["c"], c, user, "parked", "c")
    parked = stores["c"].update_sandbox(parked.id, status=Status.STOPPED)
    busy = stores["c"].create_sandbox(
        user.id, image="minimal", engine="qemu", name="busy", node="c"
    )
    await c.create(SandboxSpec(sandbox_id=busy.id, name="busy", memory_mb=256))

    stores["c"].set_node_state("c", NodeState.DRAINING)
    moved = await Takeover(stores["c"], c, "c").move_stopped(Placer(stores["c"]))

    assert [(m.sandbox_id, m.to, m.error) for m in moved] == [(parked.id, "b", None)]
    assert stores["b"].get_sandbox(parked.id).node == "b"
    assert stores["b"].get_sandbox(busy.id).node == "c"
    assert parked.id not in {i.sandbox_id for i in c.list()}
    row = await Takeover(stores["b"], b, "b").adopt_claimed(stores["b"].get_sandbox(parked.id))
    assert (row.status, row.thermal) == (Status.STOPPED, Thermal.COLD)
    await b.start(row.id)
    assert await sh(await b.agent(row.id), "cat /home/sandbox/mine.txt") == "parked\n"
    assert await sh(await c.agent(busy.id), "echo still here") == "still here\n"
