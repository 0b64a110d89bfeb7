"""The pure decision function: no engine, no clock, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.engine import Status, Thermal
from kiln.protocol import ActivityInfo
from kiln.thermal import (
    Pause,
    SandboxView,
    Stop,
    ThermalPolicy,
    decide,
    eligible,
    needs_agent_query,
)

NOW = 10_000.0
P = ThermalPolicy(hot_to_warm_s=30, warm_to_cold_s=1800, tick_s=10)


def view(
    thermal: Thermal = Thermal.HOT,
    *,
    idle: float = 60.0,
    agent_idle: float | None = 60.0,
    attached: int = 0,
    status: Status = Status.RUNNING,
    keep_hot: bool = False,
    since_ago: float = 10_000.0,
    id: str = "sb-1",
) -> SandboxView:
    agent = None if agent_idle is None else ActivityInfo(NOW - agent_idle, attached, 0)
    return SandboxView(
        id=id,
        thermal=thermal,
        status=status,
        keep_hot=keep_hot,
        state_since=NOW - since_ago,
        host_activity=NOW - idle,
        agent=agent,
    )


def test_idle_hot_sandbox_is_paused() -> None:
    assert decide(NOW, [view()], P) == [Pause("sb-1")]


def test_threshold_is_inclusive() -> None:
    assert decide(NOW, [view(idle=30, agent_idle=30)], P) == [Pause("sb-1")]
    assert decide(NOW, [view(idle=29.9, agent_idle=30)], P) == []


@pytest.mark.parametrize(
    "v",
    [
        view(idle=5),  # recent API activity
        view(agent_idle=5),  # recent activity inside the guest
        view(attached=1),  # a terminal is attached
        view(agent_idle=None),  # the agent did not answer: not proof of idleness
        view(since_ago=5),  # just became hot (or just started being watched)
        view(keep_hot=True),
        view(status=Status.STOPPED),
        view(status=Status.ERROR),
        view(status=Status.UNKNOWN),
        view(Thermal.COLD, idle=1e6, agent_idle=None),
    ],
)
def test_hot_sandbox_left_alone(v: SandboxView) -> None:
    assert decide(NOW, [v], P) == []


def test_warm_to_cold_after_long_idle() -> None:
    assert decide(NOW, [view(Thermal.WARM, idle=1800, agent_idle=None)], P) == [Stop("sb-1")]
    assert decide(NOW, [view(Thermal.WARM, idle=1799, agent_idle=None)], P) == []
    # warm for a short while only: the time in the warm state counts from its start
    assert decide(NOW, [view(Thermal.WARM, idle=5000, since_ago=100, agent_idle=None)], P) == []
    assert decide(NOW, [view(Thermal.WARM, idle=5000, keep_hot=True)], P) == []
    assert decide(NOW, [view(Thermal.WARM, idle=5000, status=Status.STOPPED)], P) == []


def test_many_at_once_keep_order() -> None:
    views = [
        view(id="a"),
        view(Thermal.WARM, id="b", idle=4000, agent_idle=None),
        view(id="c", idle=1),
        view(Thermal.COLD, id="d", idle=1e9),
        view(id="e", keep_hot=True),
        view(Thermal.WARM, id="f", idle=4000, agent_idle=None),
    ]
    assert decide(NOW, views, P) == [Pause("a"), Stop("b"), Stop("f")]


def test_guest_clock_ahead_of_host_counts_as_recent() -> None:
    assert decide(NOW, [view(agent_idle=-100)], P) == []


def test_needs_agent_query() -> None:
    no_agent = {"agent_idle": None}
    assert needs_agent_query(NOW, view(idle=30, **no_agent), P)  # type: ignore[arg-type]
    assert not needs_agent_query(NOW, view(idle=29, **no_agent), P)  # type: ignore[arg-type]
    assert not needs_agent_query(NOW, view(Thermal.WARM), P)  # never wake one to ask
    assert not needs_agent_query(NOW, view(Thermal.COLD), P)
    assert not needs_agent_query(NOW, view(keep_hot=True), P)
    assert not needs_agent_query(NOW, view(status=Status.STOPPED), P)
    assert not needs_agent_query(NOW, view(since_ago=3), P)
    short = ThermalPolicy(activity_cache_s=5)
    assert needs_agent_query(NOW, view(idle=6), short)
    assert not needs_agent_query(NOW, view(idle=4), short)
    assert ThermalPolicy(hot_to_warm_s=12).query_after_s == 12


def test_no_host_activity_uses_state_since() -> None:
    v = SandboxView("x", Thermal.HOT, Status.RUNNING, False, state_since=NOW - 100)
    assert needs_agent_query(NOW, v, P)
    assert decide(NOW, [v], P) == []  # still needs the agent's word


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hot_to_warm_s": 0},
        {"warm_to_cold_s": -1},
        {"tick_s": 0},
        {"query_timeout_s": 0},
        {"activity_cache_s": -1},
    ],
)
def test_policy_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ThermalPolicy(**kwargs)


views_strategy = st.builds(
    SandboxView,
    id=st.text(min_size=1, max_size=4),
    thermal=st.sampled_from(list(Thermal)),
    status=st.sampled_from(list(Status)),
    keep_hot=st.booleans(),
    state_since=st.floats(0, 20_000),
    host_activity=st.none() | st.floats(0, 20_000),
    agent=st.none()
    | st.builds(
        ActivityInfo,
        st.floats(0, 20_000),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
)


@given(st.lists(views_strategy, max_size=8), st.floats(0, 30_000))
def test_decide_properties(views: list[SandboxView], now: float) -> None:
    actions = decide(now, views, P)
    by_id: dict[str, list[SandboxView]] = {}
    for v in views:
        by_id.setdefault(v.id, []).append(v)
    assert len(actions) <= len(views)
    for action in actions:
        candidates = by_id[action.id]
        assert any(eligible(v) for v in candidates)
        if isinstance(action, Pause):
            assert any(
                v.thermal is Thermal.HOT and v.agent is not None and v.agent.attached_sessions == 0
                for v in candidates
            )
        else:
            assert any(v.thermal is Thermal.WARM for v in candidates)
