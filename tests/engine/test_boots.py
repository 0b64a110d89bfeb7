"""Boot reasons (:mod:`kiln.engine.boots`): which transitions bring up a new machine, and why."""

from __future__ import annotations

import pytest

from kiln.engine.boots import BootReason, LastBoot, boot_reason
from kiln.engine.states import Action, State, Status, Thermal

R, S = Status.RUNNING, Status.STOPPED
HOT, WARM, COLD = Thermal.HOT, Thermal.WARM, Thermal.COLD


@pytest.mark.parametrize("snapshots", [True, False])
@pytest.mark.parametrize(
    "action", [Action.NOTHING, Action.PAUSE, Action.RESUME, Action.SNAPSHOT, Action.KILL]
)
def test_actions_without_a_new_machine_are_no_boot(action: Action, snapshots: bool) -> None:
    assert boot_reason(action, State(R, HOT), snapshots=snapshots) is None
    assert boot_reason(Action.SHUTDOWN, State(R, HOT), snapshots=snapshots) is None


def test_a_restore_keeps_the_processes() -> None:
    assert boot_reason(Action.RESTORE, State(R, COLD)) is BootReason.RESTORED
    assert boot_reason(Action.RESTORE, State(S, COLD)) is BootReason.RESTORED


@pytest.mark.parametrize("before", [State(R, COLD), State(S, COLD)])
def test_with_snapshots_a_boot_of_an_existing_sandbox_is_a_reboot(before: State) -> None:
    # Only a lost snapshot makes such an engine boot an existing sandbox.
    assert boot_reason(Action.BOOT, before, snapshots=True) is BootReason.REBOOTED


def test_without_snapshots_a_boot_from_stopped_is_a_start() -> None:
    assert boot_reason(Action.BOOT, State(S, COLD), snapshots=False) is BootReason.STARTED
    # Running and cold: recovery found its machine gone.
    assert boot_reason(Action.BOOT, State(R, COLD), snapshots=False) is BootReason.REBOOTED


def test_last_boot_round_trips_and_refuses_junk() -> None:
    boot = LastBoot(BootReason.REBOOTED, 1700000000.5)
    assert LastBoot.from_json(boot.to_json()) == boot
    assert boot.to_json() == {"reason": "rebooted", "at": 1700000000.5}
    for junk in (None, "rebooted", {}, {"reason": "sideways", "at": 1.0}, {"reason": "created"}):
        assert LastBoot.from_json(junk) is None
