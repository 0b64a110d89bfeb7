"""Every lifecycle/thermal transition of a QEMU sandbox, in one table.

The engine's view of a sandbox is a (status, thermal) pair:

    RUNNING:  hot ──pause──▶ warm ──stop──▶ cold
               ▲  ◀─resume──  │              │
               └──── ensure_hot / start ◀────┘      (hot ──stop──▶ cold directly too)
    ERROR:    QEMU died underneath us; only destroy
    UNKNOWN:  recovered without a live QEMU or a valid snapshot; only destroy

"Stopped by the user" is the store's business (the API's ``stopped`` status):
for the engine an explicit stop and the thermal manager's cold step are the
same snapshot, and the engine's status stays ``running``.

:func:`plan` maps an operation and the current state to the one action the
engine must carry out (or raises). The engine checks states nowhere else.
"""

from __future__ import annotations

from enum import StrEnum

from ..base import Status, Thermal
from ..errors import InvalidState, SandboxCrashed


class Op(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    START = "start"
    ENSURE_HOT = "ensure_hot"


class Action(StrEnum):
    NOTHING = "nothing"  # already there
    PAUSE = "pause"  # QMP stop: hot → warm
    RESUME = "resume"  # QMP cont: warm → hot
    SNAPSHOT = "snapshot"  # save to disk, QEMU exits: → cold
    RESTORE = "restore"  # new QEMU from the snapshot: cold → hot


_N, _P, _R, _S, _L = Action.NOTHING, Action.PAUSE, Action.RESUME, Action.SNAPSHOT, Action.RESTORE

#: thermal state of a RUNNING sandbox → {op: action}. A missing op is InvalidState.
TABLE: dict[Thermal, dict[Op, Action]] = {
    Thermal.HOT: {Op.PAUSE: _P, Op.RESUME: _N, Op.STOP: _S, Op.START: _N, Op.ENSURE_HOT: _N},
    Thermal.WARM: {Op.PAUSE: _N, Op.RESUME: _R, Op.STOP: _S, Op.START: _R, Op.ENSURE_HOT: _R},
    Thermal.COLD: {Op.STOP: _N, Op.START: _L, Op.ENSURE_HOT: _L},
}

#: The thermal state an action leaves behind (None: unchanged).
THERMAL_AFTER: dict[Action, Thermal | None] = {
    Action.NOTHING: None,
    Action.PAUSE: Thermal.WARM,
    Action.RESUME: Thermal.HOT,
    Action.SNAPSHOT: Thermal.COLD,
    Action.RESTORE: Thermal.HOT,
}


def plan(op: Op, status: Status, thermal: Thermal, sandbox_id: str = "") -> Action:
    """The action ``op`` needs in this state; raises if the state does not allow it."""
    who = f"sandbox {sandbox_id}" if sandbox_id else "sandbox"
    if status is Status.ERROR:
        raise SandboxCrashed(f"{who} has crashed; destroy it")
    if status is not Status.RUNNING:
        raise InvalidState(f"{who} is {status} (no live VM and no usable snapshot); destroy it")
    action = TABLE[thermal].get(op)
    if action is None:
        raise InvalidState(f"cannot {op} {who} while it is {thermal}; use ensure_hot or start")
    return action
