"""The lifecycle/thermal table."""

from __future__ import annotations

import pytest

from kiln.engine.base import Status, Thermal
from kiln.engine.errors import InvalidState, SandboxCrashed
from kiln.engine.qemu.states import THERMAL_AFTER, Action, Op, plan

R = Status.RUNNING


@pytest.mark.parametrize(
    ("op", "thermal", "action"),
    [
        (Op.PAUSE, Thermal.HOT, Action.PAUSE),
        (Op.PAUSE, Thermal.WARM, Action.NOTHING),
        (Op.RESUME, Thermal.WARM, Action.RESUME),
        (Op.RESUME, Thermal.HOT, Action.NOTHING),
        (Op.STOP, Thermal.HOT, Action.SNAPSHOT),
        (Op.STOP, Thermal.WARM, Action.SNAPSHOT),
        (Op.STOP, Thermal.COLD, Action.NOTHING),
        (Op.START, Thermal.COLD, Action.RESTORE),
        (Op.START, Thermal.WARM, Action.RESUME),
        (Op.START, Thermal.HOT, Action.NOTHING),
        (Op.ENSURE_HOT, Thermal.HOT, Action.NOTHING),
        (Op.ENSURE_HOT, Thermal.WARM, Action.RESUME),
        (Op.ENSURE_HOT, Thermal.COLD, Action.RESTORE),
    ],
)
def test_running_sandboxes(op: Op, thermal: Thermal, action: Action) -> None:
    assert plan(op, R, thermal) is action


@pytest.mark.parametrize("op", [Op.PAUSE, Op.RESUME])
def test_pause_and_resume_do_not_touch_a_cold_sandbox(op: Op) -> None:
    with pytest.raises(InvalidState, match="ensure_hot"):
        plan(op, R, Thermal.COLD, "sb1")


@pytest.mark.parametrize("op", list(Op))
def test_a_crashed_sandbox_only_allows_destroy(op: Op) -> None:
    with pytest.raises(SandboxCrashed, match="destroy"):
        plan(op, Status.ERROR, Thermal.COLD, "sb1")


@pytest.mark.parametrize("op", list(Op))
def test_an_unknown_sandbox_only_allows_destroy(op: Op) -> None:
    with pytest.raises(InvalidState, match="destroy"):
        plan(op, Status.UNKNOWN, Thermal.COLD)


def test_every_action_has_a_resulting_thermal_state() -> None:
    assert set(THERMAL_AFTER) == set(Action)
    assert THERMAL_AFTER[Action.RESTORE] is Thermal.HOT
    assert THERMAL_AFTER[Action.SNAPSHOT] is Thermal.COLD
