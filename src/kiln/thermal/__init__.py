"""Thermal management: idle sandboxes go hot → warm (paused) → cold (snapshot on disk).

:mod:`.policy` decides (pure), :mod:`.manager` gathers the inputs and acts,
:mod:`.clock` is the injected time source.
"""

from .clock import Clock, SystemClock
from .manager import (
    ActivitySource,
    ChangeCallback,
    SandboxSource,
    ThermalManager,
    Tracked,
    engine_activity_source,
)
from .policy import (
    Action,
    Pause,
    SandboxView,
    Stop,
    ThermalPolicy,
    decide,
    eligible,
    idle_since,
    needs_agent_query,
)

__all__ = [
    "Action",
    "ActivitySource",
    "ChangeCallback",
    "Clock",
    "Pause",
    "SandboxSource",
    "SandboxView",
    "Stop",
    "SystemClock",
    "ThermalManager",
    "ThermalPolicy",
    "Tracked",
    "decide",
    "eligible",
    "engine_activity_source",
    "idle_since",
    "needs_agent_query",
]
