"""The thermal manager over the fake engine, with time driven by a manual clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fakes.clock import ManualClock
from fakes.engine import FakeEngine
from kiln.engine import EngineError, Status, Thermal
from kiln.protocol import ActivityInfo
from kiln.store import Store
from kiln.thermal import Pause, Stop, ThermalManager, ThermalPolicy

POLICY = ThermalPolicy(hot_to_warm_s=30, warm_to_cold_s=1800, tick_s=10)


@dataclass
class Row:
    id: str
    status: Status = Status.RUNNING
    keep_hot: bool = False
    last_active_at: float = 0.0


@dataclass
class Rig:
    engine: FakeEngine
    clock: ManualClock
    rows: list[Row]
    manager: ThermalManager
    changes: list[tuple[str, Thermal]] = field(default_factory=list)

    def add(self, sid: str, thermal: Thermal = Thermal.HOT, **kw: object) -> Row:
        self.engine.add(sid, thermal=thermal)
        row = Row(sid, **kw)  # type: ignore[arg-type]
        self.rows.append(row)
        return row

    def idle_agent(self, sid: str, *, attached: int = 0) -> None:
        self.engine.set_activity(sid, self.clock.now() - 10_000, attached=attached)


@pytest.fixture
def rig() -> Rig:
    engine = FakeEngine()
    clock = ManualClock()
    rows: list[Row] = []
    changes: list[tuple[str, Thermal]] = []
    manager = ThermalManager(
        engine,
        sandboxes=lambda: rows,
        clock=clock,
        policy=POLICY,
        activity_source=engine.activity,
        on_change=lambda sid, t: changes.append((sid, t)),
    )
    return Rig(engine, clock, rows, manager, changes)


async def test_hot_warm_cold_lifecycle(rig: Rig) -> None:
    rig.add("a")
    rig.idle_agent("a")
    assert await rig.manager.tick() == []  # first sighting: grace period starts
    rig.clock.advance(29)
    assert await rig.manager.tick() == []
    rig.clock.advance(1)
    assert await rig.manager.tick() == [Pause("a")]
    assert rig.engine.thermal("a") is Thermal.WARM
    rig.clock.advance(1799)
    assert await rig.manager.tick() == []
    rig.clock.advance(1)
    assert await rig.manager.tick() == [Stop("a")]
    assert rig.engine.thermal("a") is Thermal.COLD
    rig.clock.advance(100_000)
    assert await rig.manager.tick() == []  # cold is final
    assert rig.changes == [("a", Thermal.WARM), ("a", Thermal.COLD)]
    assert rig.engine.called("pause") == ["a"] and rig.engine.called("stop") == ["a"]


async def test_touch_keeps_it_hot_and_skips_the_agent(rig: Rig) -> None:
    rig.add("a")
    rig.idle_agent("a")
    await rig.manager.tick()
    for _ in range(10):
        rig.clock.advance(20)
        rig.manager.touch("a")
        assert await rig.manager.tick() == []
    assert rig.engine.activity_queries == []  # recently used: no need to ask
    rig.clock.advance(30)
    assert await rig.manager.tick() == [Pause("a")]
    assert rig.engine.activity_queries == ["a"]


async def test_store_last_active_at_counts_as_host_activity(rig: Rig) -> None:
    row = rig.add("a")
    rig.idle_agent("a")
    await rig.manager.tick()
    rig.clock.advance(100)
    row.last_active_at = rig.clock.now() - 5
    assert await rig.manager.tick() == []
    assert rig.engine.activity_queries == []


async def test_agent_activity_and_attached_sessions_keep_it_hot(rig: Rig) -> None:
    rig.add("busy")
    rig.add("attached")
    rig.add("idle")
    rig.idle_agent("attached", attached=1)
    rig.idle_agent("idle")
    await rig.manager.tick()
    rig.clock.advance(60)
    rig.engine.set_activity("busy", rig.clock.now() - 3, running=1)
    assert await rig.manager.tick() == [Pause("idle")]
    assert rig.engine.thermal("busy") is Thermal.HOT
    assert rig.engine.thermal("attached") is Thermal.HOT


async def test_only_hot_sandboxes_are_asked(rig: Rig) -> None:
    for sid, thermal in [("h", Thermal.HOT), ("w", Thermal.WARM), ("c", Thermal.COLD)]:
        rig.add(sid, thermal)
    rig.add("kh", keep_hot=True)
    rig.add("st", status=Status.STOPPED)
    for sid in ("h", "kh", "st"):
        rig.idle_agent(sid)
    await rig.manager.tick()
    rig.clock.advance(3600)
    actions = await rig.manager.tick()
    assert actions == [Pause("h"), Stop("w")]
    # the fake refuses to answer for a sandbox that is not hot, so this also
    # proves nothing was woken to be asked
    assert sorted(set(rig.engine.activity_queries)) == ["h"]
    assert rig.engine.called("ensure_hot") == [] and rig.engine.called("resume") == []


async def test_keep_hot_toggled_in_the_source(rig: Rig) -> None:
    row = rig.add("a", keep_hot=True)
    rig.idle_agent("a")
    await rig.manager.tick()
    rig.clock.advance(3600)
    assert await rig.manager.tick() == []
    row.keep_hot = False
    assert await rig.manager.tick() == [Pause("a")]


async def test_one_failing_sandbox_does_not_stop_the_others(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    for sid in ("a", "b", "c"):
        rig.add(sid)
        rig.idle_agent(sid)
    rig.engine.fail("pause", "a")
    rig.engine.fail("activity", "b")
    await rig.manager.tick()
    rig.clock.advance(60)
    with caplog.at_level(logging.WARNING, logger="kiln.thermal"):
        assert await rig.manager.tick() == [Pause("c")]
    assert "pause of sandbox a failed" in caplog.text
    assert "sandbox b: agent activity query failed" in caplog.text
    # fixed: retried on the next tick
    rig.engine.heal("pause", "a")
    rig.engine.heal("activity", "b")
    rig.clock.advance(10)
    assert await rig.manager.tick() == [Pause("a"), Pause("b")]


async def test_thermal_lookup_error_skips_that_sandbox(rig: Rig) -> None:
    rig.add("a")
    rig.add("b")
    rig.idle_agent("a")
    rig.idle_agent("b")
    rig.engine.fail("thermal", "a")
    rig.rows.append(Row("ghost"))  # in the store, unknown to the engine
    await rig.manager.tick()
    rig.clock.advance(60)
    assert await rig.manager.tick() == [Pause("b")]


async def test_hanging_agent_query_times_out(rig: Rig) -> None:
    never = asyncio.Event()

    async def activity(sid: str) -> ActivityInfo:
        if sid == "hang":
            await never.wait()
        return await rig.engine.activity(sid)

    manager = ThermalManager(
        rig.engine,
        sandboxes=lambda: rig.rows,
        clock=rig.clock,
        policy=ThermalPolicy(query_timeout_s=0.05),
        activity_source=activity,
    )
    rig.add("hang")
    rig.add("ok")
    rig.idle_agent("ok")
    await manager.tick()
    rig.clock.advance(60)
    assert await manager.tick() == [Pause("ok")]


async def test_callback_and_source_errors_are_contained(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_callback(sid: str, thermal: Thermal) -> None:
        raise RuntimeError("persist failed")

    def bad_source() -> list[Row]:
        raise RuntimeError("db gone")

    rig.add("a")
    rig.idle_agent("a")
    manager = ThermalManager(
        rig.engine,
        sandboxes=lambda: rig.rows,
        clock=rig.clock,
        policy=POLICY,
        activity_source=rig.engine.activity,
        on_change=bad_callback,
    )
    await manager.tick()
    rig.clock.advance(60)
    with caplog.at_level(logging.WARNING, logger="kiln.thermal"):
        assert await manager.tick() == [Pause("a")]
    assert "on_change callback failed" in caplog.text
    broken = ThermalManager(rig.engine, sandboxes=bad_source, clock=rig.clock)
    with caplog.at_level(logging.ERROR, logger="kiln.thermal"):
        assert await broken.tick() == []
    assert "cannot list sandboxes" in caplog.text


async def test_activity_during_the_tick_cancels_the_action(rig: Rig) -> None:
    """A request arriving while the manager is deciding wins over the decision."""
    rig.add("a")
    rig.add("b")
    rig.add("w", Thermal.WARM)
    rig.idle_agent("a")
    rig.idle_agent("b")

    async def activity(sid: str) -> ActivityInfo:
        if sid == "b":  # meanwhile: a request for "a", one that wakes "w"
            rig.manager.touch("a", rig.clock.now() + 0.5)
            await rig.engine.resume("w")
        return await rig.engine.activity(sid)

    rig.manager._activity = activity  # swap the source for this one test
    await rig.manager.tick()
    rig.clock.advance(3600)
    assert await rig.manager.tick() == [Pause("b")]
    assert rig.engine.thermal("a") is Thermal.HOT
    assert rig.engine.thermal("w") is Thermal.HOT


async def test_woken_sandbox_gets_a_fresh_grace_period(rig: Rig) -> None:
    rig.add("a")
    rig.idle_agent("a")
    await rig.manager.tick()
    rig.clock.advance(60)
    assert await rig.manager.tick() == [Pause("a")]
    await rig.engine.ensure_hot("a")  # a request woke it
    rig.clock.advance(10)
    assert await rig.manager.tick() == []
    rig.clock.advance(30)
    assert await rig.manager.tick() == [Pause("a")]


async def test_deleted_sandboxes_are_forgotten(rig: Rig) -> None:
    rig.add("a")
    rig.manager.touch("a")
    await rig.manager.tick()
    assert rig.manager.last_touch("a") is not None
    rig.rows.clear()
    await rig.manager.tick()
    assert rig.manager.last_touch("a") is None
    assert rig.manager._seen == {}


async def test_touch_never_moves_back(rig: Rig) -> None:
    rig.manager.touch("a", 100.0)
    rig.manager.touch("a", 50.0)
    assert rig.manager.last_touch("a") == 100.0


async def test_loop_runs_on_the_injected_clock(rig: Rig) -> None:
    rig.add("a")
    rig.idle_agent("a")
    rig.manager.start()
    with pytest.raises(RuntimeError):
        rig.manager.start()
    await rig.clock.wait_for_sleepers(1)  # first tick done
    for _ in range(3):  # 30 s of manual time, 3 ticks, no real sleeping
        rig.clock.advance(POLICY.tick_s)
        await asyncio.sleep(0)
        await rig.clock.wait_for_sleepers(1)
    assert rig.changes == [("a", Thermal.WARM)]
    await rig.manager.aclose()
    await rig.manager.aclose()  # idempotent
    assert rig.clock.sleepers == 0


async def test_loop_in_a_task_group_and_as_context_manager(rig: Rig) -> None:
    rig.add("a")
    rig.idle_agent("a")
    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(rig.manager.run())
            await rig.clock.wait_for_sleepers(1)
            rig.clock.advance(30)
            await asyncio.sleep(0)
            await rig.clock.wait_for_sleepers(1)
            raise RuntimeError("daemon shutting down")  # cancels the loop task
    assert rig.changes == [("a", Thermal.WARM)]
    async with rig.manager:
        await rig.clock.wait_for_sleepers(1)
    assert rig.clock.sleepers == 0


async def test_loop_survives_an_unexpected_tick_error(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def failing_tick() -> list[Pause | Stop]:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    rig.manager.tick = failing_tick  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="kiln.thermal"):
        rig.manager.start()
        await rig.clock.wait_for_sleepers(1)
        rig.clock.advance(10)
        await asyncio.sleep(0)
        await rig.clock.wait_for_sleepers(1)
        await rig.manager.aclose()
    assert calls == 2
    assert "thermal tick failed" in caplog.text


# --- with the real store as the source ---------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "kiln.db") as s:
        yield s


async def test_with_store_source_and_persisting_callback(store: Store) -> None:
    engine = FakeEngine()
    clock = ManualClock()
    user, _ = store.create_user("u")
    a = store.create_sandbox(user.id, image="m", engine=engine.name)
    kept = store.create_sandbox(user.id, image="m", engine=engine.name, keep_hot=True)
    for sb in (a, kept):
        engine.add(sb.id)
        engine.set_activity(sb.id, 0.0)

    def persist(sid: str, thermal: Thermal) -> None:
        store.update_sandbox(sid, thermal=thermal, engine_state=engine.export_state(sid))

    manager = ThermalManager(
        engine,
        sandboxes=lambda: store.list_live_sandboxes(engine.name),
        clock=clock,
        activity_source=engine.activity,
        on_change=persist,
    )
    await manager.tick()
    clock.advance(31)
    assert await manager.tick() == [Pause(a.id)]
    got = store.get_sandbox(a.id)
    assert got.thermal is Thermal.WARM
    assert got.engine_state is not None and got.engine_state["alive"] == "warm"
    assert store.get_sandbox(kept.id).thermal is Thermal.HOT
    store.delete_sandbox(a.id)
    clock.advance(4000)
    assert await manager.tick() == []  # deleted: no longer watched


async def test_engine_error_types_are_engine_errors() -> None:
    engine = FakeEngine()
    with pytest.raises(EngineError):
        engine.thermal("nope")


async def test_unknown_to_engine_is_logged_once_and_not_running_rows_are_skipped(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.rows.append(Row("ghost"))
    rig.rows.append(Row("stopped", status=Status.STOPPED))  # engine does not know it either
    with caplog.at_level(logging.WARNING, logger="kiln.thermal"):
        for _ in range(3):
            await rig.manager.tick()
            rig.clock.advance(10)
    assert caplog.text.count("no state for sandbox ghost") == 1
    assert "stopped" not in caplog.text
