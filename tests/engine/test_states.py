"""The one table of lifecycle and thermal transitions (:mod:`kiln.engine.states`).

The expected table is written out here cell by cell, independently of the
module's, so that a changed cell shows up as a failing test naming it.
"""

from __future__ import annotations

import itertools

import pytest

from kiln.engine.errors import InvalidState, SandboxCrashed
from kiln.engine.states import (
    ADOPTED,
    CREATED,
    TABLE,
    Action,
    Found,
    Op,
    State,
    Status,
    Thermal,
    from_disk,
    lookup,
    observed,
    plan,
    rebooted,
    recovered,
    table,
)

R, S, E, U = Status.RUNNING, Status.STOPPED, Status.ERROR, Status.UNKNOWN
HOT, WARM, COLD = Thermal.HOT, Thermal.WARM, Thermal.COLD
ALL_STATES = [State(s, t) for s, t in itertools.product(Status, Thermal)]
COLUMNS = (State(R, HOT), State(R, WARM), State(R, COLD), State(S, COLD))
NO = "refused"

# op: what it does from running/hot, running/warm, running/cold, stopped/cold
WITH_SNAPSHOTS: dict[Op, tuple[str, str, str, str]] = {
    Op.PAUSE: ("pause → running/warm", "nothing → running/warm", NO, NO),
    Op.RESUME: ("nothing → running/hot", "resume → running/hot", NO, NO),
    Op.COOL: (
        "snapshot → running/cold",
        "snapshot → running/cold",
        "nothing → running/cold",
        NO,
    ),
    Op.STOP: (
        "snapshot → stopped/cold",
        "snapshot → stopped/cold",
        "nothing → stopped/cold",
        "nothing → stopped/cold",
    ),
    Op.START: (
        "nothing → running/hot",
        "resume → running/hot",
        "restore → running/hot",
        "restore → running/hot",
    ),
    Op.ENSURE_HOT: (
        "nothing → running/hot",
        "resume → running/hot",
        "restore → running/hot",
        "restore → running/hot",
    ),
    # The machine died, its disks intact: its next use boots it from them.
    Op.CRASH: (
        "kill → running/cold",
        "kill → running/cold",
        "kill → running/cold",
        "kill → stopped/cold",
    ),
    Op.LOST: ("kill → error/cold", "kill → error/cold", "kill → error/cold", "kill → error/cold"),
}

# Running and cold without snapshots: only recovery or a crash leaves it (machine gone,
# files kept).
WITHOUT_SNAPSHOTS: dict[Op, tuple[str, str, str, str]] = {
    Op.PAUSE: ("pause → running/warm", "nothing → running/warm", NO, NO),
    Op.RESUME: ("nothing → running/hot", "resume → running/hot", NO, NO),
    Op.COOL: (NO, NO, NO, NO),
    Op.STOP: (
        "shutdown → stopped/cold",
        "shutdown → stopped/cold",
        "nothing → stopped/cold",
        "nothing → stopped/cold",
    ),
    Op.START: (
        "nothing → running/hot",
        "resume → running/hot",
        "boot → running/hot",
        "boot → running/hot",
    ),
    Op.ENSURE_HOT: (
        "nothing → running/hot",
        "resume → running/hot",
        "boot → running/hot",
        "boot → running/hot",
    ),
    # The machine died, its disks intact: its next use boots it from them.
    Op.CRASH: (
        "kill → running/cold",
        "kill → running/cold",
        "kill → running/cold",
        "kill → stopped/cold",
    ),
    Op.LOST: ("kill → error/cold", "kill → error/cold", "kill → error/cold", "kill → error/cold"),
}


def _cell(op: Op, state: State, *, snapshots: bool = True) -> str:
    step = lookup(op, state, snapshots=snapshots)
    return NO if step is None else f"{step.action} → {step.next}"


def _cases(expected: dict[Op, tuple[str, str, str, str]]) -> list[tuple[Op, State, str]]:
    return [
        (op, state, cell)
        for op, row in expected.items()
        for state, cell in zip(COLUMNS, row, strict=True)
    ]


def test_the_expected_tables_cover_every_op() -> None:
    assert set(WITH_SNAPSHOTS) == set(Op) == set(WITHOUT_SNAPSHOTS)


@pytest.mark.parametrize(("op", "state", "expected"), _cases(WITH_SNAPSHOTS))
def test_usable_states(op: Op, state: State, expected: str) -> None:
    assert _cell(op, state) == expected
    if expected == NO:
        with pytest.raises(InvalidState, match=str(op)):
            plan(op, state, "sb1")
    else:
        assert plan(op, state, "sb1") == lookup(op, state)


@pytest.mark.parametrize(("op", "state", "expected"), _cases(WITHOUT_SNAPSHOTS))
def test_usable_states_without_snapshots(op: Op, state: State, expected: str) -> None:
    assert _cell(op, state, snapshots=False) == expected
    if expected == NO:
        with pytest.raises(InvalidState):
            plan(op, state, "sb1", snapshots=False)


@pytest.mark.parametrize("thermal", list(Thermal))
@pytest.mark.parametrize("op", list(Op))
def test_a_crashed_sandbox_can_only_be_deleted(op: Op, thermal: Thermal) -> None:
    state = State(E, thermal)
    if op is Op.CRASH:  # noticed again: nothing changes
        assert _cell(op, state) == f"nothing → error/{thermal}"
    elif op is Op.LOST:
        assert _cell(op, state) == "kill → error/cold"
    else:
        assert lookup(op, state) is None
        with pytest.raises(SandboxCrashed, match="sandbox sb1 has crashed; it can only be deleted"):
            plan(op, state, "sb1")


@pytest.mark.parametrize("thermal", list(Thermal))
@pytest.mark.parametrize("op", list(Op))
def test_an_unknown_sandbox_can_only_be_deleted(op: Op, thermal: Thermal) -> None:
    assert lookup(op, State(U, thermal)) is None
    with pytest.raises(InvalidState, match=r"unknown state.*can only be deleted"):
        plan(op, State(U, thermal))


@pytest.mark.parametrize("thermal", [HOT, WARM])
@pytest.mark.parametrize("op", list(Op))
def test_a_stopped_sandbox_is_never_hot_or_warm(op: Op, thermal: Thermal) -> None:
    assert lookup(op, State(S, thermal)) is None
    with pytest.raises(InvalidState, match=f"cannot {op}"):
        plan(op, State(S, thermal))


def test_every_state_and_op_is_decided() -> None:
    """Each of the 96 cells either has a transition or is refused by plan()."""
    for op, state in itertools.product(Op, ALL_STATES):
        step = lookup(op, state)
        if step is None:
            with pytest.raises((InvalidState, SandboxCrashed)):
                plan(op, state)
        else:
            assert plan(op, state) is step


@pytest.mark.parametrize("snapshots", [True, False])
def test_the_table_is_closed(snapshots: bool) -> None:
    """Every transition leads to a state of the table (and create to one too)."""
    full = table(snapshots=snapshots)
    assert CREATED.next in full
    for row in full.values():
        for step in row.values():
            assert step.next in full


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (Op.PAUSE, "cannot pause sandbox sb1 while it is cold; use ensure_hot or start"),
        (Op.RESUME, "cannot resume sandbox sb1 while it is cold; use ensure_hot or start"),
    ],
)
def test_pause_and_resume_do_not_touch_a_cold_sandbox(op: Op, message: str) -> None:
    with pytest.raises(InvalidState, match=message):
        plan(op, State(R, COLD), "sb1")


def test_a_stopped_sandbox_must_be_started_first() -> None:
    with pytest.raises(InvalidState, match="it is stopped; start it first"):
        plan(Op.PAUSE, State(S, COLD), "web")


def test_cool_without_snapshots_says_why() -> None:
    with pytest.raises(InvalidState, match="this engine has no snapshots"):
        plan(Op.COOL, State(R, WARM), "sb1", snapshots=False)


def test_created_and_new_machines() -> None:
    assert CREATED.action is Action.BOOT and CREATED.next == State(R, HOT)
    assert {a for a in Action if a.new_machine} == {Action.BOOT, Action.RESTORE}


def test_only_hot_and_warm_running_sandboxes_are_live() -> None:
    assert {s for s in ALL_STATES if s.live} == {State(R, HOT), State(R, WARM)}


def test_the_user_stop_and_the_cold_step_differ_only_in_status() -> None:
    for state in (State(R, HOT), State(R, WARM), State(R, COLD)):
        stop, cool = TABLE[state][Op.STOP], TABLE[state][Op.COOL]
        assert stop.action is cool.action
        assert (stop.next.status, cool.next.status) == (S, R)


# ------------------------------------------------------------------ recovery


def test_adopted() -> None:
    expected = {
        Found.RUNNING: State(R, HOT),
        Found.PAUSED: State(R, WARM),
        Found.SNAPSHOT: State(R, COLD),
        Found.DISK: State(R, COLD),
        Found.GONE: State(E, COLD),
        Found.NOTHING: State(U, COLD),
    }
    assert expected == ADOPTED


@pytest.mark.parametrize("state", [State(R, COLD), State(S, COLD)])
@pytest.mark.parametrize("op", [Op.START, Op.ENSURE_HOT])
def test_without_a_snapshot_a_restore_is_a_boot_from_disk(op: Op, state: State) -> None:
    step = plan(op, state, "sb1")
    assert step.action is Action.RESTORE
    assert from_disk(step) == step._replace(action=Action.BOOT)


@pytest.mark.parametrize("op", [Op.STOP, Op.COOL, Op.CRASH, Op.LOST])
def test_from_disk_changes_nothing_else(op: Op) -> None:
    step = plan(op, State(R, COLD), "sb1")
    assert from_disk(step) == step


def test_rebooted_is_running_cold_without_a_snapshot() -> None:
    assert rebooted(State(R, COLD), has_snapshot=False)
    assert not rebooted(State(R, COLD), has_snapshot=True)
    assert not rebooted(State(S, COLD), has_snapshot=False)
    assert not rebooted(State(R, HOT), has_snapshot=False)
    assert not rebooted(None, has_snapshot=False)


@pytest.mark.parametrize(
    ("stored", "engine", "has_snapshot", "expected"),
    [
        (State(R, HOT), None, False, State(U, COLD)),
        (State(R, HOT), State(E, HOT), False, State(E, HOT)),
        (State(S, COLD), State(U, COLD), False, State(U, COLD)),
        (State(S, COLD), State(R, HOT), False, State(R, HOT)),
        (State(R, HOT), State(R, WARM), True, State(R, WARM)),
        (State(R, COLD), State(R, COLD), True, State(R, COLD)),
        (State(R, HOT), State(R, COLD), True, State(S, COLD)),
        (State(R, WARM), State(R, COLD), True, State(S, COLD)),
        (State(S, COLD), State(R, COLD), True, State(S, COLD)),
        (State(U, COLD), State(R, COLD), True, State(S, COLD)),
        # No snapshot but its disks (Found.DISK): its next use boots it; stopped stays so.
        (State(R, COLD), State(R, COLD), False, State(R, COLD)),
        (State(R, HOT), State(R, COLD), False, State(R, COLD)),
        (State(R, WARM), State(R, COLD), False, State(R, COLD)),
        (State(S, COLD), State(R, COLD), False, State(S, COLD)),
        (State(R, HOT), State(E, COLD), False, State(E, COLD)),  # its disks are gone
        # Without snapshots the engine finds a stopped machine's files: it boots again.
        (State(R, HOT), State(S, COLD), False, State(S, COLD)),
        (State(S, COLD), State(S, COLD), False, State(S, COLD)),
    ],
)
def test_recovered(
    stored: State, engine: State | None, has_snapshot: bool, expected: State
) -> None:
    assert recovered(stored, engine, has_snapshot) == expected


@pytest.mark.parametrize(
    ("stored", "engine", "expected"),
    [
        (State(R, HOT), None, State(R, HOT)),
        (State(R, HOT), State(R, WARM), State(R, WARM)),  # the thermal manager paused it
        (State(R, WARM), State(R, COLD), State(R, COLD)),
        (State(S, COLD), State(R, COLD), State(S, COLD)),  # the engine has no "stopped"
        (State(R, HOT), State(E, HOT), State(E, HOT)),  # a crash the engine saw
        (State(S, COLD), State(E, COLD), State(E, COLD)),
        (State(U, COLD), State(R, COLD), State(U, COLD)),  # what recovery found stands
        (State(E, COLD), State(R, HOT), State(E, HOT)),
        (State(S, COLD), State(R, HOT), State(R, HOT)),  # a live machine is running
    ],
)
def test_observed(stored: State, engine: State | None, expected: State) -> None:
    assert observed(stored, engine) == expected
