"""Every lifecycle and thermal transition of a sandbox, in one table.

A sandbox's state is a (status, thermal) pair. Status is its lifecycle as the
API reports it, thermal how much of it is awake::

    running   hot ──pause──▶ warm ──cool──▶ cold      (hot ──cool──▶ cold too)
               ▲ ◀──resume──  │               │
               └──── start / ensure_hot ◀─────┘
    stopped   cold: the user's stop (any running state ──stop──▶ stopped);
              start or ensure_hot makes it running and hot again
    error     a snapshot or restore failed half-way (lost), or its machine is gone
              and its disks with it (lost; recovery: gone); only destroy
    unknown   recovered, but what is left of it could not be checked (its engine
              could not re-adopt it); only destroy

:data:`TABLE` maps each state and :class:`Op` to a :class:`Transition`: the
:class:`Action` to carry out and the state it leads to. A missing entry is an
operation the state does not allow; :func:`plan` raises the one error for that
(:class:`~kiln.engine.errors.SandboxCrashed` for a crashed sandbox,
:class:`~kiln.engine.errors.InvalidState` otherwise), so nobody else checks a
state. Every engine, the service layer, recovery and the thermal manager ask
this module and set a state only by applying a transition's ``next``.

Who asks for what:

- Engines plan their own methods: ``pause`` (PAUSE), ``resume`` (RESUME),
  ``stop`` (COOL), ``start`` (START), ``ensure_hot``/``agent`` (ENSURE_HOT),
  and the events they observe (CRASH: the machine died, its disks are intact;
  LOST: nothing left to run it from). An engine cannot tell the user's
  stop from the thermal manager's cold step (``Engine.stop`` serves both, and
  with snapshots they are the same action), so it never records ``stopped``:
  that is the store's. ``create`` and ``destroy`` are not in the table:
  :data:`CREATED` is the state every create leads to, and destroy is allowed in
  every state (it kills what runs and frees everything).
- The service layer plans the user's STOP, START and ENSURE_HOT against the
  stored state merged with the engine's (:func:`observed`) and stores ``next``.
- The thermal manager plans PAUSE and COOL and stores the resulting thermal state.
- Recovery maps what survived a daemon restart: :data:`ADOPTED` (engine side)
  and :func:`recovered` (store side).

Reboot: a sandbox whose machine is gone without a usable snapshot but whose
disks are intact is *running and cold* with no snapshot: its next use boots it
again from its disks, like a machine that rebooted -- files kept, processes
lost. That is what recovery makes of one found so after a daemon restart (a
host reboot: :data:`Found.DISK`), and what CRASH makes of one whose machine
dies (killed, crashed, hung and killed) while the daemon runs. On an engine
with snapshots the RESTORE of such a sandbox is a BOOT (:func:`from_disk`);
without snapshots every restore is one anyway. Only a sandbox whose disks are
gone too is in error (LOST).

An action that fails before its point of no return leaves the state it started
from (an engine puts it back if it noticed a crash on the way); one that fails
after it is LOST.

Capabilities: with ``snapshots=False`` (an engine that cannot save a running
sandbox to disk, e.g. a container runtime without checkpoints) COOL is refused,
the user's stop ends the processes and keeps the files (SHUTDOWN) and a start
boots it again (BOOT); only recovery or a crash makes such a sandbox running and cold
(its machine gone, its files kept: the next use boots it).
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from .errors import InvalidState, SandboxCrashed


class Thermal(StrEnum):
    HOT = "hot"  # running
    WARM = "warm"  # paused: memory kept, vCPUs/processes stopped
    COLD = "cold"  # no machine running: a snapshot on disk (or, without one, its files only)


class Status(StrEnum):
    """Lifecycle as the API reports it; the thermal states of a usable sandbox are
    all ``running``."""

    RUNNING = "running"
    STOPPED = "stopped"  # explicitly stopped by the user
    ERROR = "error"  # crashed
    UNKNOWN = "unknown"  # recovered, but its engine could not tell what is left of it


class State(NamedTuple):
    status: Status
    thermal: Thermal

    def __str__(self) -> str:
        return f"{self.status}/{self.thermal}"

    @property
    def live(self) -> bool:
        """A machine of it should be running (hot or warm): if it is gone, it crashed."""
        return self.status is Status.RUNNING and self.thermal is not Thermal.COLD


class Op(StrEnum):
    """What is asked of a sandbox, or (CRASH, LOST) what an engine observed."""

    PAUSE = "pause"  # hot → warm (the thermal manager)
    RESUME = "resume"  # warm → hot
    COOL = "cool"  # → cold, still running: the thermal manager's cold step; Engine.stop
    STOP = "stop"  # the user's stop: → stopped
    START = "start"  # the user's start: → running and hot
    ENSURE_HOT = "ensure_hot"  # → hot from any usable state: anything that uses it
    #: The machine died or stopped answering (and was killed); its disks are intact:
    #: running and cold, its next use boots it from them (a reboot).
    CRASH = "crash"
    #: Nothing to run it from: a snapshot or restore failed half-way (no machine, no
    #: snapshot), or its machine is gone and its disks with it.
    LOST = "lost"


class Action(StrEnum):
    """What the engine carries out for a transition."""

    NOTHING = "nothing"  # already there
    BOOT = "boot"  # start a new machine from its disks
    PAUSE = "pause"  # stop its CPUs, keep its memory
    RESUME = "resume"  # let a paused machine run again
    SNAPSHOT = "snapshot"  # save the machine to disk, then end it
    RESTORE = "restore"  # a new machine from the snapshot (the snapshot is spent)
    SHUTDOWN = "shutdown"  # end the machine, keep its files
    KILL = "kill"  # make sure nothing of it runs (nothing to do if it already died)

    @property
    def new_machine(self) -> bool:
        """The sandbox comes back as a new machine: connections into the old one are gone."""
        return self in (Action.BOOT, Action.RESTORE)


class Transition(NamedTuple):
    action: Action
    next: State


Table = dict[State, dict[Op, Transition]]

_R, _S, _E, _U = Status.RUNNING, Status.STOPPED, Status.ERROR, Status.UNKNOWN
_HOT, _WARM, _COLD = Thermal.HOT, Thermal.WARM, Thermal.COLD
_A = Action


def _to(action: Action, status: Status, thermal: Thermal) -> Transition:
    return Transition(action, State(status, thermal))


#: The state a new sandbox is in once its create returns (action: boot).
CREATED = _to(_A.BOOT, _R, _HOT)

#: state → op → transition, for an engine with snapshots. A missing op is refused.
TABLE: Table = {
    State(_R, _HOT): {
        Op.PAUSE: _to(_A.PAUSE, _R, _WARM),
        Op.RESUME: _to(_A.NOTHING, _R, _HOT),
        Op.COOL: _to(_A.SNAPSHOT, _R, _COLD),
        Op.STOP: _to(_A.SNAPSHOT, _S, _COLD),
        Op.START: _to(_A.NOTHING, _R, _HOT),
        Op.ENSURE_HOT: _to(_A.NOTHING, _R, _HOT),
        Op.CRASH: _to(_A.KILL, _R, _COLD),
        Op.LOST: _to(_A.KILL, _E, _COLD),
    },
    State(_R, _WARM): {
        Op.PAUSE: _to(_A.NOTHING, _R, _WARM),
        Op.RESUME: _to(_A.RESUME, _R, _HOT),
        Op.COOL: _to(_A.SNAPSHOT, _R, _COLD),
        Op.STOP: _to(_A.SNAPSHOT, _S, _COLD),
        Op.START: _to(_A.RESUME, _R, _HOT),
        Op.ENSURE_HOT: _to(_A.RESUME, _R, _HOT),
        Op.CRASH: _to(_A.KILL, _R, _COLD),
        Op.LOST: _to(_A.KILL, _E, _COLD),
    },
    State(_R, _COLD): {
        Op.COOL: _to(_A.NOTHING, _R, _COLD),
        Op.STOP: _to(_A.NOTHING, _S, _COLD),
        Op.START: _to(_A.RESTORE, _R, _HOT),
        Op.ENSURE_HOT: _to(_A.RESTORE, _R, _HOT),
        Op.CRASH: _to(_A.KILL, _R, _COLD),  # its restore or boot crashed
        Op.LOST: _to(_A.KILL, _E, _COLD),
    },
    State(_S, _COLD): {
        Op.STOP: _to(_A.NOTHING, _S, _COLD),
        Op.START: _to(_A.RESTORE, _R, _HOT),
        Op.ENSURE_HOT: _to(_A.RESTORE, _R, _HOT),
        Op.CRASH: _to(_A.KILL, _S, _COLD),  # its start crashed: still stopped
        Op.LOST: _to(_A.KILL, _E, _COLD),
    },
    # A sandbox in error stays in it: a crash noticed again changes nothing.
    **{
        State(_E, t): {Op.CRASH: _to(_A.NOTHING, _E, t), Op.LOST: _to(_A.KILL, _E, _COLD)}
        for t in Thermal
    },
    **{State(_U, t): {} for t in Thermal},
}


#: What an action becomes on an engine without snapshots.
_NO_SNAPSHOT_ACTION = {Action.SNAPSHOT: Action.SHUTDOWN, Action.RESTORE: Action.BOOT}


def from_disk(step: Transition) -> Transition:
    """``step`` for a cold sandbox without a usable snapshot: a restore boots it from
    its disks (:data:`Found.DISK`)."""
    return step._replace(action=Action.BOOT) if step.action is Action.RESTORE else step


def _without_snapshots(full: Table) -> Table:
    """The table for an engine that cannot save a running sandbox to disk. (Running
    and cold is only ever what recovery or a crash leaves: a machine gone, its files kept.)"""
    return {
        state: {
            op: step._replace(action=_NO_SNAPSHOT_ACTION.get(step.action, step.action))
            for op, step in row.items()
            if op is not Op.COOL
        }
        for state, row in full.items()
    }


_TABLE_WITHOUT_SNAPSHOTS = _without_snapshots(TABLE)


def table(*, snapshots: bool = True) -> Table:
    """The transition table for an engine with (or without) snapshots."""
    return TABLE if snapshots else _TABLE_WITHOUT_SNAPSHOTS


def lookup(op: Op, state: State, *, snapshots: bool = True) -> Transition | None:
    """The transition ``op`` makes from ``state``; None if the state does not allow it."""
    return table(snapshots=snapshots).get(state, {}).get(op)


def plan(op: Op, state: State, sandbox: str = "", *, snapshots: bool = True) -> Transition:
    """The transition ``op`` makes from ``state``; raises if the state does not allow it.

    ``sandbox`` (an id or name) goes into the error message.
    """
    step = lookup(op, state, snapshots=snapshots)
    if step is not None:
        return step
    who = f"sandbox {sandbox}" if sandbox else "the sandbox"
    if state.status is Status.ERROR:
        raise SandboxCrashed(f"{who} has crashed; it can only be deleted")
    if state.status is Status.UNKNOWN:
        raise InvalidState(
            f"{who} is in an unknown state (nothing usable survived a restart); "
            "it can only be deleted"
        )
    if op is Op.COOL and not snapshots:
        raise InvalidState(f"cannot take {who} cold: this engine has no snapshots")
    if state.status is Status.STOPPED and op in (Op.PAUSE, Op.RESUME, Op.COOL):
        raise InvalidState(f"cannot {op} {who}: it is stopped; start it first")
    if state.thermal is Thermal.COLD and op in (Op.PAUSE, Op.RESUME):
        raise InvalidState(f"cannot {op} {who} while it is cold; use ensure_hot or start")
    raise InvalidState(f"cannot {op} {who} while it is {state}")


# ------------------------------------------------------------------ recovery


class Found(StrEnum):
    """What an engine finds of a sandbox when it re-adopts it after a daemon restart."""

    RUNNING = "running"  # a live machine whose CPUs run
    PAUSED = "paused"  # a live machine, paused
    SNAPSHOT = "snapshot"  # no machine, a usable snapshot
    DISK = "disk"  # no machine, no usable snapshot, its disks intact: it boots from them
    GONE = "gone"  # no machine, no snapshot, and its disks are missing or unreadable
    NOTHING = "nothing"  # what is left could not be checked


#: The engine's state of a re-adopted sandbox.
ADOPTED: dict[Found, State] = {
    Found.RUNNING: State(_R, _HOT),
    Found.PAUSED: State(_R, _WARM),
    Found.SNAPSHOT: State(_R, _COLD),
    Found.DISK: State(_R, _COLD),  # info.has_snapshot tells it from SNAPSHOT
    Found.GONE: State(_E, _COLD),
    Found.NOTHING: State(_U, _COLD),
}


def recovered(stored: State, engine: State | None, has_snapshot: bool) -> State:
    """The state a sandbox gets after a daemon restart, from the ``stored`` one and
    what the engine re-adopted (``engine``; None if it could not):

    =====================  =========================  ===============================
    engine reports          stored                     result
    =====================  =========================  ===============================
    error / unknown         any                        as the engine says
    live (hot/warm)         any                        running, as the engine says
    stopped (no snapshots)  any                        stopped, cold (its files)
    cold, snapshot          running and already cold   running, cold (nothing lost)
    cold, snapshot          anything else              stopped, cold (restorable)
    cold, no snapshot       stopped                    stopped, cold (start boots it)
    cold, no snapshot       anything else              running, cold (rebooted: the
                                                       next use boots it from its disks)
    nothing (None)          any                        unknown
    =====================  =========================  ===============================

    A sandbox that was running hot when its machine died but which has an older
    snapshot is *stopped* rather than silently restored: its snapshot is older
    than the state it was in, and the user should choose to start it. One
    without a snapshot has nothing to choose between: it boots from its disks,
    as a machine does after a power cut.
    """
    if engine is None:
        return ADOPTED[Found.NOTHING]
    if engine.status in (_E, _U):
        return engine
    if engine.thermal is not _COLD:
        return State(_R, engine.thermal)
    if engine.status is _S:
        return engine  # no snapshots: its files survived, and it boots again from them
    if not has_snapshot:
        return State(_S, _COLD) if stored.status is _S else State(_R, _COLD)
    if stored == State(_R, _COLD):
        return stored
    return State(_S, _COLD)


def rebooted(engine: State | None, has_snapshot: bool) -> bool:
    """Whether what the engine re-adopted is a sandbox that boots from its disks."""
    return engine == ADOPTED[Found.DISK] and not has_snapshot


def observed(stored: State, engine: State | None) -> State:
    """A sandbox's state now: the ``stored`` one updated by what the ``engine`` sees
    (None: the engine cannot tell).

    The engine knows whether the machine runs and whether it crashed; the store
    knows whether the user stopped it and what recovery found. The engine's
    thermal state wins; a crash the engine saw, and an error or unknown status
    the store holds, win over running or stopped; a live machine is running
    whatever the store says.
    """
    if engine is None:
        return stored
    if engine.status in (_E, _U):
        return engine
    if stored.status in (_E, _U):
        return State(stored.status, engine.thermal)
    if engine.thermal is not _COLD:
        return State(_R, engine.thermal)
    return State(stored.status, _COLD)


__all__ = [
    "ADOPTED",
    "CREATED",
    "TABLE",
    "Action",
    "Found",
    "Op",
    "State",
    "Status",
    "Thermal",
    "Transition",
    "from_disk",
    "lookup",
    "observed",
    "plan",
    "rebooted",
    "recovered",
    "table",
]
