"""The fake engine plans with the same table as the real engines.

It stands in for QEMU in the tests of the layers above the engine, so where
the two could disagree (they once did: pausing a warm sandbox raised in the
fake and did nothing in QEMU) the fake follows :mod:`kiln.engine.states`.
"""

from __future__ import annotations

import pytest

from fakes.engine import FakeEngine
from kiln.engine import InvalidState, SandboxCrashed, SandboxSpec, Status, Thermal
from kiln.engine.states import ADOPTED, Found, State


@pytest.fixture
async def engine() -> FakeEngine:
    engine = FakeEngine()
    await engine.create(SandboxSpec(sandbox_id="a", name="a"))
    return engine


def state(engine: FakeEngine, sid: str = "a") -> State:
    return engine.info(sid).state


async def test_pausing_a_warm_and_resuming_a_hot_sandbox_change_nothing(
    engine: FakeEngine,
) -> None:
    assert state(engine) == State(Status.RUNNING, Thermal.HOT)
    await engine.resume("a")
    assert state(engine) == State(Status.RUNNING, Thermal.HOT)
    await engine.pause("a")
    await engine.pause("a")
    assert state(engine) == State(Status.RUNNING, Thermal.WARM)


async def test_stop_and_start_spend_the_snapshot_as_qemu_does(engine: FakeEngine) -> None:
    info = await engine.stop("a")
    # the engine never records "stopped": that is the store's
    assert (info.state, info.has_snapshot) == (State(Status.RUNNING, Thermal.COLD), True)
    with pytest.raises(InvalidState, match="ensure_hot or start"):
        await engine.pause("a")
    info = await engine.start("a")
    assert (info.state, info.has_snapshot) == (State(Status.RUNNING, Thermal.HOT), False)


async def test_a_cold_sandbox_without_a_snapshot_cannot_be_restored() -> None:
    engine = FakeEngine()
    engine.add("a", thermal=Thermal.COLD, has_snapshot=False)
    with pytest.raises(InvalidState, match="no valid snapshot"):
        await engine.ensure_hot("a")
    assert state(engine) == State(Status.RUNNING, Thermal.COLD)


async def test_a_crashed_sandbox_boots_from_its_disk_on_next_use(engine: FakeEngine) -> None:
    engine.crash("a")
    assert state(engine) == State(Status.RUNNING, Thermal.COLD)
    assert not engine.info("a").has_snapshot
    await engine.ensure_hot("a")
    info = engine.info("a")
    assert info.state == State(Status.RUNNING, Thermal.HOT)
    assert info.last_boot is not None and info.last_boot.reason == "rebooted"


async def test_a_crash_without_its_disk_refuses_everything_but_destroy(
    engine: FakeEngine,
) -> None:
    engine.crash("a", disk_gone=True)
    assert state(engine) == State(Status.ERROR, Thermal.COLD)
    assert engine.info("a").problem
    for op in (engine.pause, engine.resume, engine.stop, engine.start, engine.ensure_hot):
        with pytest.raises(SandboxCrashed):
            await op("a")
    await engine.destroy("a")
    assert engine.list() == []


@pytest.mark.parametrize(
    ("alive", "has_snapshot", "found"),
    [
        ("hot", False, Found.RUNNING),
        ("warm", True, Found.PAUSED),
        (None, True, Found.SNAPSHOT),
        (None, False, Found.NOTHING),
    ],
)
async def test_import_state_adopts_by_the_table(
    alive: str | None, has_snapshot: bool, found: Found
) -> None:
    engine = FakeEngine()
    info = await engine.import_state(
        {"sandbox_id": "a", "alive": alive, "has_snapshot": has_snapshot}
    )
    assert info.state == ADOPTED[found]
