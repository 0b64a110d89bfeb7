"""What the thermal manager should do, as a pure function of time and sandboxes.

    decide(now, views, policy) -> [Pause(id) | Stop(id), ...]

No I/O, no clock: :class:`~kiln.thermal.manager.ThermalManager` gathers the
views, calls :func:`decide`, then acts.

Rules (a sandbox is *eligible* when it is ``running`` and not ``keep_hot``):

- hot → warm (:class:`Pause`) once it has been idle for ``hot_to_warm_s`` and
  its agent reports no attached session. Without a fresh agent report the
  sandbox stays hot: an unanswered query is no proof that nobody is attached.
- warm → cold (:class:`Stop`, a snapshot to disk) once idle for ``warm_to_cold_s``.
- cold, stopped, errored, unknown or ``keep_hot`` sandboxes are never touched.

"Idle since" is the latest of: host-side API activity, the agent's
``last_activity_unix``, and the moment the manager saw the sandbox enter its
current thermal state (so a sandbox that just woke up, or that the manager has
just started watching, gets the full grace period).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.engine.base import VM_CAPABILITIES, Capabilities, Status, Thermal
from kiln.protocol import ActivityInfo


@dataclass(frozen=True, slots=True)
class ThermalPolicy:
    hot_to_warm_s: float = 30.0
    warm_to_cold_s: float = 1800.0
    tick_s: float = 10.0
    # Skip the agent query while host-side activity is more recent than this
    # (the sandbox is in use, no decision could come of it). None: hot_to_warm_s,
    # the largest value that never delays a pause.
    activity_cache_s: float | None = None
    query_timeout_s: float = 2.0  # per agent activity query

    def __post_init__(self) -> None:
        for name in ("hot_to_warm_s", "warm_to_cold_s", "tick_s", "query_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ThermalPolicy.{name} must be positive")
        if self.activity_cache_s is not None and self.activity_cache_s < 0:
            raise ValueError("ThermalPolicy.activity_cache_s must not be negative")

    @property
    def query_after_s(self) -> float:
        """Host-side idle time after which the agent is asked for its activity."""
        return self.hot_to_warm_s if self.activity_cache_s is None else self.activity_cache_s


@dataclass(frozen=True, slots=True)
class SandboxView:
    """Everything :func:`decide` knows about one sandbox."""

    id: str
    thermal: Thermal
    status: Status
    keep_hot: bool
    state_since: float  # when it was seen entering its current thermal state
    host_activity: float | None = None  # last host-side API activity (unix s)
    agent: ActivityInfo | None = None  # the agent's report from this tick, if asked
    #: What its engine can do with it: no warm step without pause, no cold step
    #: without snapshots (e.g. a container: its processes would end).
    capabilities: Capabilities = VM_CAPABILITIES


@dataclass(frozen=True, slots=True)
class Pause:
    """hot → warm."""

    id: str


@dataclass(frozen=True, slots=True)
class Stop:
    """warm → cold (snapshot to disk, release memory)."""

    id: str


Action = Pause | Stop


def eligible(view: SandboxView) -> bool:
    return view.status is Status.RUNNING and not view.keep_hot


def idle_since(view: SandboxView) -> float:
    marks = [view.state_since]
    if view.host_activity is not None:
        marks.append(view.host_activity)
    if view.agent is not None:
        marks.append(view.agent.last_activity_unix)
    return max(marks)


def needs_agent_query(now: float, view: SandboxView, policy: ThermalPolicy) -> bool:
    """Ask the agent only about hot sandboxes (never wake one to ask) not recently used,
    and only if it can be paused."""
    if not eligible(view) or view.thermal is not Thermal.HOT or not view.capabilities.pause:
        return False
    host_side = view.state_since
    if view.host_activity is not None:
        host_side = max(host_side, view.host_activity)
    return now - host_side >= policy.query_after_s


def decide(now: float, views: list[SandboxView], policy: ThermalPolicy) -> list[Action]:
    actions: list[Action] = []
    for view in views:
        if not eligible(view):
            continue
        idle = now - idle_since(view)
        if view.thermal is Thermal.HOT:
            if view.agent is None or view.agent.attached_sessions > 0:
                continue
            if idle >= policy.hot_to_warm_s and view.capabilities.pause:
                actions.append(Pause(view.id))
        elif (
            view.thermal is Thermal.WARM
            and idle >= policy.warm_to_cold_s
            and view.capabilities.snapshots
        ):
            actions.append(Stop(view.id))
    return actions
