"""An in-memory :class:`~kiln.engine.base.Engine` for testing the layers above the engine.

It keeps sandboxes in a dict, plans every state change with
:mod:`kiln.engine.states` as the real engines do (so it refuses and allows the
same operations, with the same errors), records every call, lets a test inject
failures and set what each "guest agent" reports as activity. It is not an
engine to test engine behaviour with: the engine conformance suite runs
against real engines.

Exported state is a plain dict; :meth:`FakeEngine.import_state` models what a
daemon restart found, from the keys a test puts there:

    {"sandbox_id": ..., "name": ..., "cpus": 1, "memory_mb": 512, ...,
     "alive": "hot" | "warm" | None,    # a VM that survived the daemon
     "has_snapshot": bool}

It is strict about types: ``cpus``/``memory_mb`` must arrive as ``int`` and
flags as ``bool``, as they would from a correct JSON round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from kiln.agent_client import AgentClient
from kiln.engine.base import SandboxInfo, SandboxSpec, Status, Thermal
from kiln.engine.errors import (
    EngineError,
    EngineUnavailable,
    InvalidSpec,
    InvalidState,
    SandboxNotFound,
)
from kiln.engine.states import ADOPTED, CREATED, Action, Found, Op, Transition, plan
from kiln.protocol import ActivityInfo


@dataclass
class _Box:
    info: SandboxInfo


class FakeEngine:
    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.boxes: dict[str, _Box] = {}
        self.calls: list[tuple[str, str]] = []  # (method, sandbox_id)
        self.activity_queries: list[str] = []
        self.activity_info: dict[str, ActivityInfo] = {}
        self.failures: dict[tuple[str, str], EngineError] = {}
        self.closed = False
        self.prepared: list[SandboxSpec] = []

    # --- test controls ----------------------------------------------------------------

    def fail(self, method: str, sandbox_id: str, error: EngineError | None = None) -> None:
        """Make ``method`` raise for ``sandbox_id`` (until :meth:`heal`)."""
        self.failures[(method, sandbox_id)] = error or EngineError(f"injected {method} failure")

    def heal(self, method: str, sandbox_id: str) -> None:
        self.failures.pop((method, sandbox_id), None)

    def set_activity(
        self, sandbox_id: str, last_activity_unix: float, *, attached: int = 0, running: int = 0
    ) -> None:
        self.activity_info[sandbox_id] = ActivityInfo(last_activity_unix, attached, running)

    def add(
        self,
        sandbox_id: str,
        *,
        thermal: Thermal = Thermal.HOT,
        status: Status = Status.RUNNING,
        keep_hot: bool = False,
        has_snapshot: bool | None = None,
    ) -> SandboxInfo:
        """Put a sandbox in a given state directly (no create call recorded): a test's
        starting point, not a transition."""
        info = SandboxInfo(
            sandbox_id=sandbox_id,
            name=sandbox_id,
            engine=self.name,
            image="minimal",
            status=status,
            thermal=thermal,
            ip=None,
            cpus=1,
            memory_mb=512,
            keep_hot=keep_hot,
            has_snapshot=thermal is Thermal.COLD if has_snapshot is None else has_snapshot,
        )
        self.boxes[sandbox_id] = _Box(info)
        return info

    def called(self, method: str) -> list[str]:
        """Sandbox ids ``method`` was called for, in order."""
        return [sid for m, sid in self.calls if m == method]

    # --- the Engine interface ---------------------------------------------------------

    def _enter(self, method: str, sandbox_id: str) -> _Box | None:
        self.calls.append((method, sandbox_id))
        error = self.failures.get((method, sandbox_id))
        if error is not None:
            raise error
        return self.boxes.get(sandbox_id)

    def _box(self, method: str, sandbox_id: str) -> _Box:
        box = self._enter(method, sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return box

    def _set(self, box: _Box, **changes: Any) -> SandboxInfo:
        box.info = replace(box.info, **changes)
        return box.info

    def _transition(self, method: str, sandbox_id: str, op: Op) -> SandboxInfo:
        """Plan ``op`` as the real engines do, "carry out" its action, apply its next state."""
        box = self._box(method, sandbox_id)
        step = plan(op, box.info.state, sandbox_id)
        return self._apply(box, step)

    def _apply(self, box: _Box, step: Transition) -> SandboxInfo:
        has_snapshot = box.info.has_snapshot
        if step.action is Action.SNAPSHOT:
            has_snapshot = True
        elif step.action is Action.RESTORE:
            if not has_snapshot:
                raise InvalidState(f"cannot restore {box.info.sandbox_id}: no valid snapshot")
            has_snapshot = False  # spent, as in QEMU: the restored machine moves on
        return self._set(
            box, status=step.next.status, thermal=step.next.thermal, has_snapshot=has_snapshot
        )

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        spec.validate()
        if spec.engine is not None and spec.engine != self.name:
            raise InvalidSpec(f"spec for engine {spec.engine!r} given to {self.name!r}")
        if self._enter("create", spec.sandbox_id) is not None:
            raise InvalidState(f"sandbox {spec.sandbox_id} exists")
        n = len(self.boxes) + 2
        info = SandboxInfo(
            sandbox_id=spec.sandbox_id,
            name=spec.name,
            engine=self.name,
            image=spec.image,
            status=CREATED.next.status,
            thermal=CREATED.next.thermal,
            ip=f"10.99.0.{n}",
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            keep_hot=spec.keep_hot,
            runtime=spec.runtime,
        )
        self.boxes[spec.sandbox_id] = _Box(info)
        return info

    async def destroy(self, sandbox_id: str) -> None:
        self._enter("destroy", sandbox_id)
        self.boxes.pop(sandbox_id, None)

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        return self._transition("stop", sandbox_id, Op.COOL)

    async def start(self, sandbox_id: str) -> SandboxInfo:
        return self._transition("start", sandbox_id, Op.START)

    async def pause(self, sandbox_id: str) -> None:
        self._transition("pause", sandbox_id, Op.PAUSE)

    async def resume(self, sandbox_id: str) -> None:
        self._transition("resume", sandbox_id, Op.RESUME)

    async def ensure_hot(self, sandbox_id: str) -> None:
        self._transition("ensure_hot", sandbox_id, Op.ENSURE_HOT)

    def crash(self, sandbox_id: str) -> SandboxInfo:
        """The sandbox's machine dies underneath us (a test control)."""
        return self._transition("crash", sandbox_id, Op.CRASH)

    def thermal(self, sandbox_id: str) -> Thermal:
        box = self.boxes.get(sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        error = self.failures.get(("thermal", sandbox_id))
        if error is not None:
            raise error
        return box.info.thermal

    def info(self, sandbox_id: str) -> SandboxInfo:
        box = self.boxes.get(sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return box.info

    def list(self) -> list[SandboxInfo]:
        return [box.info for box in self.boxes.values()]

    async def agent(self, sandbox_id: str) -> AgentClient:
        self._box("agent", sandbox_id)
        raise EngineUnavailable("the fake engine has no guest agent; use activity()")

    async def activity(self, sandbox_id: str) -> ActivityInfo:
        """What the sandbox's agent would answer; an activity source for the thermal manager.

        Refuses a sandbox that is not hot: asking would have to wake it.
        """
        self.activity_queries.append(sandbox_id)
        box = self._box("activity", sandbox_id)
        if box.info.thermal is not Thermal.HOT:
            raise InvalidState(f"sandbox {sandbox_id} is {box.info.thermal}: asking would wake it")
        return self.activity_info.get(sandbox_id, ActivityInfo(0.0))

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        box = self._box("export_state", sandbox_id)
        i = box.info
        alive = None if i.thermal is Thermal.COLD else i.thermal.value
        return {
            "sandbox_id": i.sandbox_id,
            "name": i.name,
            "image": i.image,
            "cpus": i.cpus,
            "memory_mb": i.memory_mb,
            "keep_hot": i.keep_hot,
            "ip": i.ip,
            "alive": alive,
            "has_snapshot": i.has_snapshot,
        }

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        sandbox_id = state.get("sandbox_id")
        if not isinstance(sandbox_id, str):
            raise InvalidState(f"state without a sandbox_id: {state!r}")
        self._enter("import_state", sandbox_id)
        for key in ("cpus", "memory_mb"):
            value = state.get(key, 1)
            if type(value) is not int:
                raise InvalidState(f"{key} must be an int, got {type(value).__name__} {value!r}")
        for key in ("keep_hot", "has_snapshot"):
            if type(state.get(key, False)) is not bool:
                raise InvalidState(f"{key} must be a bool, got {state.get(key)!r}")
        alive = state.get("alive")
        has_snapshot = bool(state.get("has_snapshot", False))
        if alive:
            found = Found.RUNNING if Thermal(alive) is Thermal.HOT else Found.PAUSED
        else:
            found = Found.SNAPSHOT if has_snapshot else Found.NOTHING
        adopted = ADOPTED[found]
        info = SandboxInfo(
            sandbox_id=sandbox_id,
            name=str(state.get("name", sandbox_id)),
            engine=self.name,
            image=str(state.get("image", "minimal")),
            status=adopted.status,
            thermal=adopted.thermal,
            ip=state.get("ip") if alive else None,
            cpus=int(state.get("cpus", 1)),
            memory_mb=int(state.get("memory_mb", 512)),
            keep_hot=bool(state.get("keep_hot", False)),
            has_snapshot=has_snapshot,
        )
        if alive or has_snapshot:
            self.boxes[sandbox_id] = _Box(info)
        return info

    async def prepare(self, spec: SandboxSpec) -> None:
        spec.validate()
        self.prepared.append(spec)

    async def cleanup_orphans(self) -> list[str]:
        self.calls.append(("cleanup_orphans", ""))
        return []

    async def delete_volume(self, volume_id: str) -> None:
        self.calls.append(("delete_volume", volume_id))

    async def close(self) -> None:
        self.closed = True
