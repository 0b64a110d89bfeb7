"""How a sandbox's machine came to be: its last boot (``last_boot`` in the API).

Every machine an engine brings up -- a create, a restore from a snapshot, a
boot from the sandbox's disks -- is a *boot*, and users need to know which
kind the last one was: only a restore kept their running processes, and a
``rebooted`` sandbox lost them (its machine was gone without a usable
snapshot, for instance after a host reboot, and it booted again from its
disks). A resume from warm is not a boot: the same machine goes on.

Engines keep a :class:`LastBoot` per sandbox and put it in their exported
state under :data:`STATE_KEY`, so that it outlives a daemon restart.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from .states import Action, State, Status

#: The key of a :class:`LastBoot` in an engine's exported state.
STATE_KEY: Final = "last_boot"


class BootReason(StrEnum):
    CREATED = "created"  # its create (booted, or restored from a template)
    STARTED = "started"  # booted from its disks by a start after a stop that ended it
    RESTORED = "restored"  # restored from its snapshot: processes and memory kept
    REBOOTED = "rebooted"  # its machine was lost without a snapshot: booted from its disks


@dataclass(frozen=True, slots=True)
class LastBoot:
    reason: BootReason
    at: float  # unix seconds

    @classmethod
    def now(cls, reason: BootReason) -> LastBoot:
        return cls(reason, time.time())

    def to_json(self) -> dict[str, Any]:
        return {"reason": str(self.reason), "at": self.at}

    @classmethod
    def from_json(cls, data: object) -> LastBoot | None:
        """What :meth:`to_json` made; None for anything else (a state saved before
        boots were recorded, or damaged)."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(BootReason(data["reason"]), float(data["at"]))
        except (KeyError, TypeError, ValueError):
            return None


def boot_reason(action: Action, before: State, *, snapshots: bool = True) -> BootReason | None:
    """Why the machine that ``action`` (from ``before``) brings up is booted; None if
    the action brings up no new machine.

    A BOOT of an existing sandbox on an engine with snapshots only happens when its
    snapshot is gone (:func:`~kiln.engine.states.from_disk`): a reboot. Without
    snapshots the user's stop ended the processes on purpose, so a boot from
    stopped is a start; from anything else (running, and cold: recovery found its
    machine gone) it is a reboot.
    """
    if action is Action.RESTORE:
        return BootReason.RESTORED
    if action is not Action.BOOT:
        return None
    if not snapshots and before.status is Status.STOPPED:
        return BootReason.STARTED
    return BootReason.REBOOTED


__all__ = ["STATE_KEY", "BootReason", "LastBoot", "boot_reason"]
