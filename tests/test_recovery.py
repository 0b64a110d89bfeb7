"""Daemon recovery over a real SQLite store and the fake engine (the layer above the engine)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fakes.engine import FakeEngine
from kiln.engine import EngineError, SandboxInfo, Status, Thermal
from kiln.recovery import recover, recovered_state
from kiln.store import Sandbox, Store, User


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "kiln.db") as s:
        yield s


@pytest.fixture
def user(store: Store) -> User:
    return store.create_user("owner")[0]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine("qemu")


def state(
    sid: str, *, alive: str | None = None, snapshot: bool = False, disk: str | None = None
) -> dict[str, Any]:
    return {
        "disk": disk,
        "sandbox_id": sid,
        "name": sid,
        "cpus": 2,
        "memory_mb": 1024,
        "keep_hot": False,
        "ip": "10.0.0.9",
        "alive": alive,
        "has_snapshot": snapshot,
    }


def row(
    store: Store,
    user: User,
    name: str,
    *,
    status: Status = Status.RUNNING,
    thermal: Thermal = Thermal.HOT,
    alive: str | None = None,
    snapshot: bool = False,
    engine: str = "qemu",
    with_state: bool = True,
    disk: str | None = None,
) -> Sandbox:
    sid = f"sb-{name}"
    return store.create_sandbox(
        user.id,
        sandbox_id=sid,
        name=name,
        image="minimal",
        engine=engine,
        cpus=2,
        memory_mb=1024,
        status=status,
        thermal=thermal,
        ip="10.0.0.9",
        engine_state=state(sid, alive=alive, snapshot=snapshot, disk=disk) if with_state else None,
    )


def after(store: Store, sb: Sandbox) -> tuple[Status, Thermal]:
    got = store.get_sandbox(sb.id, include_deleted=True)
    return got.status, got.thermal


async def test_stopped_with_snapshot_stays_stopped(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = row(store, user, "a", status=Status.STOPPED, thermal=Thermal.COLD, snapshot=True)
    report = await recover(store, engine)
    assert after(store, sb) == (Status.STOPPED, Thermal.COLD)
    assert report.stopped == [sb.id] and report.failed == []
    await engine.start(sb.id)  # re-adopted: the engine can restore it


async def test_stopped_without_snapshot_is_unknown(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = row(store, user, "a", status=Status.STOPPED, thermal=Thermal.COLD)
    report = await recover(store, engine)
    assert after(store, sb) == (Status.UNKNOWN, Thermal.COLD)
    assert report.unknown == [sb.id]


async def test_running_with_snapshot_becomes_stopped_and_restorable(
    store: Store, user: User, engine: FakeEngine
) -> None:
    hot = row(store, user, "hot", thermal=Thermal.HOT, snapshot=True)
    warm = row(store, user, "warm", thermal=Thermal.WARM, snapshot=True)
    report = await recover(store, engine)
    assert after(store, hot) == (Status.STOPPED, Thermal.COLD)
    assert after(store, warm) == (Status.STOPPED, Thermal.COLD)
    assert sorted(report.stopped) == sorted([hot.id, warm.id])
    await engine.start(hot.id)
    assert engine.thermal(hot.id) is Thermal.HOT


async def test_running_and_already_cold_stays_running(
    store: Store, user: User, engine: FakeEngine
) -> None:
    """Thermally cold (snapshot current): nothing was lost, it wakes on the next request."""
    sb = row(store, user, "a", thermal=Thermal.COLD, snapshot=True)
    report = await recover(store, engine)
    assert after(store, sb) == (Status.RUNNING, Thermal.COLD)
    assert report.running == [sb.id]


async def test_running_without_snapshot_is_unknown(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = row(store, user, "a")
    report = await recover(store, engine)
    assert after(store, sb) == (Status.UNKNOWN, Thermal.COLD)
    assert report.unknown == [sb.id]


@pytest.mark.parametrize("thermal", [Thermal.HOT, Thermal.WARM, Thermal.COLD])
async def test_running_with_only_its_disk_is_rebooted_on_next_use(
    store: Store, user: User, engine: FakeEngine, thermal: Thermal
) -> None:
    """Its machine gone without a snapshot (a host reboot): running and cold, and its
    next use boots it from its disk."""
    sb = row(store, user, "a", thermal=thermal, disk="intact")
    report = await recover(store, engine)
    assert after(store, sb) == (Status.RUNNING, Thermal.COLD)
    assert report.rebooted == [sb.id] and report.running == [sb.id]
    assert report.failed == [] and report.outcome(sb.id).rebooted
    await engine.ensure_hot(sb.id)
    info = engine.info(sb.id)
    assert info.thermal is Thermal.HOT
    assert info.last_boot is not None and info.last_boot.reason == "rebooted"


async def test_stopped_with_only_its_disk_stays_stopped_and_its_start_boots(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = row(store, user, "a", status=Status.STOPPED, thermal=Thermal.COLD, disk="intact")
    report = await recover(store, engine)
    assert after(store, sb) == (Status.STOPPED, Thermal.COLD)
    assert report.stopped == [sb.id] and report.rebooted == []
    assert (await engine.start(sb.id)).thermal is Thermal.HOT


async def test_a_sandbox_whose_disk_is_gone_is_in_error_and_says_why(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = row(store, user, "a", disk="gone")
    report = await recover(store, engine)
    assert after(store, sb) == (Status.ERROR, Thermal.COLD)
    (failed,) = report.failed
    assert failed.sandbox_id == sb.id and failed.error == "its disk /fake/rootfs is missing"
    assert report.rebooted == []


async def test_vm_that_survived_the_daemon_is_readopted(
    store: Store, user: User, engine: FakeEngine
) -> None:
    hot = row(store, user, "hot", alive="hot")
    warm = row(store, user, "warm", thermal=Thermal.WARM, alive="warm", snapshot=True)
    report = await recover(store, engine)
    assert after(store, hot) == (Status.RUNNING, Thermal.HOT)
    assert after(store, warm) == (Status.RUNNING, Thermal.WARM)
    assert store.get_sandbox(hot.id).ip == "10.0.0.9"
    assert sorted(report.running) == sorted([hot.id, warm.id])
    assert engine.thermal(hot.id) is Thermal.HOT


async def test_destroyed_and_other_engines_are_skipped(
    store: Store, user: User, engine: FakeEngine
) -> None:
    gone = row(store, user, "gone", snapshot=True)
    store.delete_sandbox(gone.id)
    docker = row(store, user, "docker", engine="docker", with_state=False)
    mine = row(store, user, "mine", status=Status.STOPPED, thermal=Thermal.COLD, snapshot=True)
    report = await recover(store, engine)
    assert engine.called("import_state") == [mine.id]
    assert report.skipped == (docker.id,)
    assert [o.sandbox_id for o in report.outcomes] == [mine.id]
    assert store.get_sandbox(docker.id) == docker  # untouched
    assert store.get_sandbox(gone.id, include_deleted=True).deleted_at is not None


async def test_engine_name_override(store: Store, user: User, engine: FakeEngine) -> None:
    sb = row(store, user, "a", engine="legacy", snapshot=True, thermal=Thermal.COLD)
    report = await recover(store, engine, engine_name="legacy")
    assert report.running == [sb.id]


async def test_missing_state_and_engine_errors_do_not_stop_the_others(
    store: Store, user: User, engine: FakeEngine
) -> None:
    no_state = row(store, user, "nostate", with_state=False)
    broken = row(store, user, "broken", snapshot=True)
    fine = row(store, user, "fine", alive="hot")
    engine.fail("import_state", broken.id, EngineError("qmp socket refused"))
    report = await recover(store, engine)
    assert after(store, fine) == (Status.RUNNING, Thermal.HOT)
    assert after(store, broken) == (Status.UNKNOWN, Thermal.COLD)
    assert after(store, no_state) == (Status.UNKNOWN, Thermal.COLD)
    failed = {o.sandbox_id: o.error for o in report.failed}
    assert failed.keys() == {broken.id, no_state.id}
    assert "qmp socket refused" in str(failed[broken.id])
    assert "no engine state" in str(failed[no_state.id])
    # the state is kept, so a later recovery can try again
    assert store.get_sandbox(broken.id).engine_state == broken.engine_state
    engine.heal("import_state", broken.id)
    again = await recover(store, engine)
    assert again.outcome(broken.id).error is None
    assert after(store, broken) == (Status.STOPPED, Thermal.COLD)


async def test_engine_answering_for_another_sandbox_is_a_failure(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = store.create_sandbox(
        user.id,
        sandbox_id="sb-mixed",
        image="m",
        engine="qemu",
        engine_state=state("sb-other", alive="hot"),
    )
    report = await recover(store, engine)
    assert report.outcome(sb.id).error is not None
    assert after(store, sb) == (Status.UNKNOWN, Thermal.COLD)


async def test_many_in_one_pass(store: Store, user: User, engine: FakeEngine) -> None:
    kinds = [
        ({"alive": "hot"}, (Status.RUNNING, Thermal.HOT)),
        ({"snapshot": True}, (Status.STOPPED, Thermal.COLD)),
        ({}, (Status.UNKNOWN, Thermal.COLD)),
    ]
    expected = {}
    for i in range(60):
        kw, outcome = kinds[i % 3]
        sb = row(store, user, f"n{i}", **kw)  # type: ignore[arg-type]
        expected[sb.id] = outcome
    report = await recover(store, engine, concurrency=4)
    assert len(report.outcomes) == 60
    assert {sid: after(store, store.get_sandbox(sid)) for sid in expected} == expected
    assert len(report.running) == len(report.stopped) == len(report.unknown) == 20


async def test_numbers_keep_their_types_through_json_and_sqlite(
    store: Store, user: User, engine: FakeEngine
) -> None:
    """The fake engine rejects 2.0 for cpus, as a strict engine parser would."""
    sid = "sb-types"
    st = {**state(sid, alive="hot"), "pid": 4242, "uptime_s": 12.5, "whole_float": 3.0}
    store.create_sandbox(
        user.id,
        sandbox_id=sid,
        image="m",
        engine="qemu",
        cpus=2.0,  # type: ignore[arg-type]  # as a JSON body may carry it
        memory_mb=1024,
        keep_hot=True,
        engine_state=st,
    )
    seen: list[Mapping[str, Any]] = []
    original = engine.import_state

    async def spy(s: Mapping[str, Any]) -> SandboxInfo:
        seen.append(s)
        return await original(s)

    engine.import_state = spy  # type: ignore[method-assign,assignment]
    report = await recover(store, engine)
    assert report.failed == []
    (got,) = seen
    assert type(got["cpus"]) is int and type(got["memory_mb"]) is int and type(got["pid"]) is int
    assert type(got["keep_hot"]) is bool and type(got["has_snapshot"]) is bool
    assert type(got["uptime_s"]) is float and type(got["whole_float"]) is float
    sb = store.get_sandbox(sid)
    assert type(sb.cpus) is int and sb.cpus == 2
    assert type(sb.keep_hot) is bool and sb.keep_hot is True
    assert sb.engine_state is not None and type(sb.engine_state["memory_mb"]) is int


async def test_sloppy_float_state_fails_cleanly(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sid = "sb-float"
    store.create_sandbox(
        user.id,
        sandbox_id=sid,
        image="m",
        engine="qemu",
        engine_state={**state(sid, alive="hot"), "cpus": 2.0},
    )
    report = await recover(store, engine)
    assert "cpus must be an int" in str(report.outcome(sid).error)
    assert store.get_sandbox(sid).status is Status.UNKNOWN


async def test_state_is_refreshed_from_the_engine(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = row(store, user, "a", thermal=Thermal.WARM, alive="warm")
    await recover(store, engine)
    refreshed = store.get_sandbox(sb.id).engine_state
    assert refreshed == engine.export_state(sb.id)
    assert refreshed is not None and refreshed["alive"] == "warm"


async def test_export_failure_keeps_the_old_state(
    store: Store, user: User, engine: FakeEngine
) -> None:
    sb = row(store, user, "a", alive="hot")
    engine.fail("export_state", sb.id)
    report = await recover(store, engine)
    assert report.failed == []
    assert store.get_sandbox(sb.id).engine_state == sb.engine_state


async def test_empty_store(store: Store, engine: FakeEngine) -> None:
    report = await recover(store, engine)
    assert report.outcomes == () and report.skipped == ()


def _info(thermal: Thermal, *, snapshot: bool, status: Status = Status.RUNNING) -> SandboxInfo:
    return SandboxInfo("sb-x", "x", "qemu", "m", status, thermal, None, 1, 512, False, snapshot)


@pytest.mark.parametrize(
    ("row_state", "info", "expected"),
    [
        ((Status.RUNNING, Thermal.HOT), None, (Status.UNKNOWN, Thermal.COLD)),
        (
            (Status.RUNNING, Thermal.HOT),
            _info(Thermal.HOT, snapshot=False),
            (Status.RUNNING, Thermal.HOT),
        ),
        (
            (Status.STOPPED, Thermal.COLD),
            _info(Thermal.WARM, snapshot=True),
            (Status.RUNNING, Thermal.WARM),
        ),
        (
            (Status.RUNNING, Thermal.COLD),
            _info(Thermal.COLD, snapshot=True),
            (Status.RUNNING, Thermal.COLD),
        ),
        (
            (Status.RUNNING, Thermal.WARM),
            _info(Thermal.COLD, snapshot=True),
            (Status.STOPPED, Thermal.COLD),
        ),
        (
            (Status.UNKNOWN, Thermal.COLD),
            _info(Thermal.COLD, snapshot=True),
            (Status.STOPPED, Thermal.COLD),
        ),
        # Cold without a snapshot: its disks (Found.DISK). Stopped stays stopped (a
        # start boots it); anything else is running and boots on next use.
        (
            (Status.STOPPED, Thermal.COLD),
            _info(Thermal.COLD, snapshot=False),
            (Status.STOPPED, Thermal.COLD),
        ),
        (
            (Status.RUNNING, Thermal.HOT),
            _info(Thermal.COLD, snapshot=False),
            (Status.RUNNING, Thermal.COLD),
        ),
        (
            (Status.RUNNING, Thermal.HOT),
            _info(Thermal.COLD, snapshot=True, status=Status.ERROR),
            (Status.ERROR, Thermal.COLD),
        ),
    ],
)
def test_recovered_state_table(
    store: Store,
    user: User,
    row_state: tuple[Status, Thermal],
    info: SandboxInfo | None,
    expected: tuple[Status, Thermal],
) -> None:
    sb = store.create_sandbox(
        user.id, image="m", engine="qemu", status=row_state[0], thermal=row_state[1]
    )
    assert recovered_state(sb, info) == expected
