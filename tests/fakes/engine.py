"""An in-memory :class:`~kiln.engine.base.Engine` for testing the layers above the engine.

It keeps sandboxes in a dict, plans every state change with
:mod:`kiln.engine.states` as the real engines do (so it refuses and allows the
same operations, with the same errors), records every call, lets a test inject
failures and set what each "guest agent" reports as activity.

Exported state is a plain dict; :meth:`FakeEngine.import_state` models what a
daemon restart found, from the keys a test puts there:

    {"sandbox_id": ..., "name": ..., "cpus": 1, "memory_mb": 512, ...,
     "alive": "hot" | "warm" | None,    # a VM that survived the daemon
     "has_snapshot": bool}

It is strict about types: ``cpus``/``memory_mb`` must arrive as ``int`` and
flags as ``bool``, as they would from a correct JSON round trip.

With ``agents=ROOT`` (opt in) every sandbox is a real test-mode guest agent
process (:mod:`fakes.agents`): ``agent()`` hands out a client to it, pause is
SIGSTOP and resume SIGCONT of all its processes, and it has no snapshots
(``Capabilities(snapshots=False)``: a stop kills its processes and keeps its
files, a start boots a new agent), so the states follow the table without
snapshots. It keeps everything under ROOT, and a second engine over the same
ROOT re-adopts what the first exported (``import_state``, which then looks at
what it finds under ROOT rather than at the keys above) or removes it
(``cleanup_orphans``). In this mode it passes the engine conformance suite
(``tests/engine/test_conformance_fake.py``); spec files must lie inside the
sandbox's working directory (:meth:`FakeEngine.workdir`: the sandboxes share
the host's file system) and there are no volumes and no addresses (``ip`` None).
The test controls (``fail``, ``calls``, ``crash``, ...) work in both modes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.agent_client import AgentClient
from kiln.engine.base import (
    Capabilities,
    SandboxInfo,
    SandboxSpec,
    SavedImage,
    Status,
    Thermal,
)
from kiln.engine.boots import STATE_KEY, BootReason, LastBoot, boot_reason
from kiln.engine.errors import (
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    InvalidSpec,
    InvalidState,
    SandboxCrashed,
    SandboxNotFound,
)
from kiln.engine.states import (
    ADOPTED,
    CREATED,
    Action,
    Found,
    Op,
    State,
    Transition,
    from_disk,
    plan,
)
from kiln.protocol import ActivityInfo

from . import agents

#: What a sandbox of ``FakeEngine(agents=...)`` can do: pause, but no snapshots.
AGENT_CAPABILITIES = Capabilities(pause=True, snapshots=False)
#: A sandbox found with its files but no machine (no snapshots: a stopped one).
FILES_ONLY = State(Status.STOPPED, Thermal.COLD)


@dataclass
class _Box:
    info: SandboxInfo
    #: Its agent process (``agents`` mode only).
    machine: agents.Machine | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Re-adopted from its disk alone (``"disk": "intact"``), or its machine crashed:
    #: its next restore boots.
    reboot: bool = False


class FakeEngine:
    def __init__(self, name: str = "fake", *, agents: Path | None = None) -> None:
        self.name = name
        self.boxes: dict[str, _Box] = {}
        self.calls: list[tuple[str, str]] = []  # (method, sandbox_id)
        self.activity_queries: list[str] = []
        self.activity_info: dict[str, ActivityInfo] = {}
        self.failures: dict[tuple[str, str], EngineError] = {}
        self.closed = False
        self.prepared: list[SandboxSpec] = []
        #: Where the sandboxes' agents live (None: no agents, states only).
        self.agents_root = agents
        self.snapshots = agents is None
        #: Saved images of an engine without a directory (with one they are on disk).
        self.saved: dict[str, SavedImage] = {}

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

    def workdir(self, sandbox_id: str) -> Path:
        """``agents`` mode: the sandbox's working directory (its files), also before
        it is created."""
        if self.agents_root is None:
            raise EngineUnavailable("the fake engine has sandbox directories only with agents")
        return agents.sandbox_dir(self.agents_root, sandbox_id) / "work"

    def machine_marker(self, sandbox_id: str) -> str:
        """``agents`` mode: KILN_FAKE_SANDBOX of every process of the sandbox."""
        if self.agents_root is None:
            raise EngineUnavailable("the fake engine has processes only with agents")
        return agents.marker_of(self.agents_root, sandbox_id)

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
        step = plan(op, box.info.state, sandbox_id, snapshots=self.snapshots)
        if box.reboot:
            step = from_disk(step)
            box.reboot = step.action is not Action.BOOT
        return self._apply(box, step)

    def _apply(self, box: _Box, step: Transition) -> SandboxInfo:
        has_snapshot = box.info.has_snapshot
        if step.action is Action.SNAPSHOT:
            has_snapshot = True
        elif step.action is Action.RESTORE:
            if not has_snapshot:
                raise InvalidState(f"cannot restore {box.info.sandbox_id}: no valid snapshot")
            has_snapshot = False  # spent, as in QEMU: the restored machine moves on
        reason = boot_reason(step.action, box.info.state, snapshots=self.snapshots)
        last_boot = box.info.last_boot if reason is None else LastBoot.now(reason)
        return self._set(
            box,
            status=step.next.status,
            thermal=step.next.thermal,
            has_snapshot=has_snapshot,
            last_boot=last_boot,
        )

    async def _act(self, method: str, sandbox_id: str, op: Op) -> SandboxInfo:
        """A transition: in ``agents`` mode carried out on the agent's processes."""
        if self.agents_root is None:
            return self._transition(method, sandbox_id, op)
        box = self._box(method, sandbox_id)
        async with box.lock:
            if self.boxes.get(sandbox_id) is not box:
                raise SandboxNotFound(f"sandbox {sandbox_id} was destroyed")
            if self._notice_death(box):
                await self._carry_out(box, Action.KILL)
            step = plan(op, box.info.state, sandbox_id, snapshots=False)
            await self._carry_out(box, step.action)
            return self._apply(box, step)

    async def _carry_out(self, box: _Box, action: Action) -> None:
        machine = box.machine
        assert machine is not None
        match action:
            case Action.NOTHING:
                pass
            case Action.PAUSE:
                await asyncio.to_thread(agents.freeze, machine.marker, _pid(machine))
            case Action.RESUME:
                await asyncio.to_thread(agents.thaw, machine.marker, _pid(machine))
            case Action.BOOT:
                problem = self._disk_gone(box)
                if problem is not None:
                    raise SandboxCrashed(
                        f"sandbox {box.info.sandbox_id} cannot boot again: {problem}"
                    )
                await self._boot(machine)
            case Action.SHUTDOWN | Action.KILL:
                await asyncio.to_thread(agents.shutdown, machine)
            case _:  # SNAPSHOT, RESTORE: never planned without snapshots
                raise AssertionError(f"{action} planned for a sandbox without snapshots")

    async def _boot(self, machine: agents.Machine) -> None:
        try:
            await asyncio.to_thread(agents.boot, machine)
        except RuntimeError as exc:
            raise EngineError(str(exc)) from exc

    def _notice_death(self, box: _Box) -> bool:
        """``agents`` mode: apply the death of a sandbox whose agent is gone; True if it
        just died. With its files (``work/``, its "disk") it is running and cold and its
        next use boots it; without them it is in error."""
        machine = box.machine
        if machine is None or not box.info.state.live or machine.running:
            return False
        if self._disk_gone(box) is None:
            self._apply(box, plan(Op.CRASH, box.info.state, box.info.sandbox_id, snapshots=False))
        return True

    def _disk_gone(self, box: _Box) -> str | None:
        """``agents`` mode: if the sandbox's files are gone, put it in error (LOST) and
        say why; else None."""
        machine = box.machine
        assert machine is not None
        if machine.workdir.is_dir():
            return None
        problem = f"its files {machine.workdir} are gone"
        self._apply(box, plan(Op.LOST, box.info.state, box.info.sandbox_id, snapshots=False))
        self._set(box, problem=problem)
        return problem

    def _check_agent_spec(self, spec: SandboxSpec) -> None:
        if spec.volumes:
            raise InvalidSpec("the fake engine with agents has no volumes")
        if not agents.sandbox_id_ok(spec.sandbox_id):
            raise InvalidSpec(f"invalid sandbox id {spec.sandbox_id!r}")
        workdir = self.workdir(spec.sandbox_id)
        for spec_file in spec.files:
            path = Path(spec_file.path)
            if not path.is_absolute() or not path.resolve().is_relative_to(workdir):
                raise InvalidSpec(
                    f"file {spec_file.path}: the fake engine writes spec files only "
                    f"inside the sandbox's working directory {workdir}"
                )

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        spec.validate()
        if spec.engine is not None and spec.engine != self.name:
            raise InvalidSpec(f"spec for engine {spec.engine!r} given to {self.name!r}")
        if self.agents_root is not None:
            self._check_agent_spec(spec)
        if self._enter("create", spec.sandbox_id) is not None:
            raise InvalidState(f"sandbox {spec.sandbox_id} exists")
        if spec.snapshot is not None:
            self._check_saved(spec)
        n = len(self.boxes) + 2
        info = SandboxInfo(
            sandbox_id=spec.sandbox_id,
            name=spec.name,
            engine=self.name,
            image=spec.image,
            status=CREATED.next.status,
            thermal=CREATED.next.thermal,
            ip=f"10.99.0.{n}" if self.agents_root is None else None,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            keep_hot=spec.keep_hot,
            runtime=spec.runtime,
            last_boot=LastBoot.now(BootReason.CREATED),
        )
        if self.agents_root is None:
            self.boxes[spec.sandbox_id] = _Box(info)
            return info
        info = replace(info, capabilities=AGENT_CAPABILITIES)
        box = self.boxes[spec.sandbox_id] = _Box(info)
        try:
            async with box.lock:
                try:
                    machine = await asyncio.to_thread(agents.create, self.agents_root, spec)
                except FileExistsError:
                    raise InvalidState(
                        f"sandbox {spec.sandbox_id} is left over from an earlier run; "
                        "destroy it first"
                    ) from None
                box.machine = machine
                if spec.snapshot is not None:
                    await self.restore_saved_files(spec.snapshot, machine.workdir)
                await self._boot(machine)
        except BaseException:
            self.boxes.pop(spec.sandbox_id, None)
            if box.machine is not None:
                await asyncio.to_thread(agents.remove, self.agents_root, spec.sandbox_id)
            raise
        return info

    async def destroy(self, sandbox_id: str) -> None:
        box = self._enter("destroy", sandbox_id)
        self.boxes.pop(sandbox_id, None)
        if self.agents_root is None:
            return
        if box is not None:
            async with box.lock:
                await asyncio.to_thread(agents.remove, self.agents_root, sandbox_id)
        elif agents.sandbox_id_ok(sandbox_id):
            # One this engine does not hold: what an earlier run left of it.
            await asyncio.to_thread(agents.remove, self.agents_root, sandbox_id)

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        # Without snapshots the engine's stop can only be the user's (states: COOL is
        # refused, STOP ends the processes and keeps the files).
        return await self._act("stop", sandbox_id, Op.COOL if self.snapshots else Op.STOP)

    async def start(self, sandbox_id: str) -> SandboxInfo:
        return await self._act("start", sandbox_id, Op.START)

    async def pause(self, sandbox_id: str) -> None:
        await self._act("pause", sandbox_id, Op.PAUSE)

    async def resume(self, sandbox_id: str) -> None:
        await self._act("resume", sandbox_id, Op.RESUME)

    async def ensure_hot(self, sandbox_id: str) -> None:
        await self._act("ensure_hot", sandbox_id, Op.ENSURE_HOT)

    async def fork(self, source_id: str, spec: SandboxSpec) -> SandboxInfo:
        """States only: a hot box like its source. Agent machines cannot fork
        (``AGENT_CAPABILITIES``), like an engine without checkpoints."""
        source = self._enter("fork", source_id)
        if source is None:
            raise SandboxNotFound(f"no sandbox {source_id!r}")
        if not source.info.capabilities.fork:
            raise InvalidState(f"sandbox {source_id} cannot be forked by the {self.name} engine")
        if spec.sandbox_id in self.boxes:
            raise InvalidState(f"sandbox {spec.sandbox_id} exists")
        info = replace(
            source.info,
            sandbox_id=spec.sandbox_id,
            name=spec.name,
            status=CREATED.next.status,
            thermal=CREATED.next.thermal,
            ip=f"10.99.0.{len(self.boxes) + 2}",
            last_boot=LastBoot.now(BootReason.CREATED),
        )
        self.boxes[spec.sandbox_id] = _Box(info)
        return info

    # --- saved images: the sandbox's files (its working directory), no memory ---------

    def saved_root(self) -> Path | None:
        """Where saved images are kept (None: in memory only)."""
        return None if self.agents_root is None else self.agents_root / "saved"

    def files_of(self, sandbox_id: str) -> Path | None:
        """The directory of the sandbox's files, if it has one."""
        return None if self.agents_root is None else self.workdir(sandbox_id)

    def saved_image(self, image_id: str) -> SavedImage | None:
        root = self.saved_root()
        if root is None:
            return self.saved.get(image_id)
        try:
            return SavedImage(**json.loads((root / image_id / "image.json").read_text()))
        except FileNotFoundError:
            return None

    def _check_saved(self, spec: SandboxSpec) -> None:
        assert spec.snapshot is not None
        image = self.saved_image(spec.snapshot)
        if image is None:
            raise ImageNotFound(f"no saved image {spec.snapshot!r} in the {self.name} engine")
        if (spec.image, spec.cpus, spec.memory_mb) != (image.image, image.cpus, image.memory_mb):
            raise InvalidSpec("a sandbox made from a saved image has its image, vCPUs and memory")

    async def restore_saved_files(self, image_id: str, workdir: Path) -> None:
        root = self.saved_root()
        if root is not None:
            await asyncio.to_thread(
                shutil.copytree,
                root / image_id / "work",
                workdir,
                symlinks=True,
                dirs_exist_ok=True,
            )

    async def save_image(self, sandbox_id: str, image_id: str) -> SavedImage:
        box = self._box("save_image", sandbox_id)
        if self.saved_image(image_id) is not None:
            raise InvalidState(f"saved image {image_id!r} already exists")
        info = box.info
        image = SavedImage(
            image_id=image_id,
            engine=self.name,
            image=info.image,
            cpus=info.cpus,
            memory_mb=info.memory_mb,
            runtime=info.runtime,
            size_bytes=0,
            memory=False,
            created_at=time.time(),
        )
        root, files = self.saved_root(), self.files_of(sandbox_id)
        if root is None:
            self.saved[image_id] = image
            return image
        async with box.lock:
            dest = root / image_id
            await asyncio.to_thread(dest.mkdir, parents=True)
            if files is not None and files.is_dir():
                await asyncio.to_thread(shutil.copytree, files, dest / "work", symlinks=True)
                size = await asyncio.to_thread(_bytes_under, dest / "work")
                image = replace(image, size_bytes=size)
            await asyncio.to_thread((dest / "image.json").write_text, json.dumps(asdict(image)))
        return image

    async def delete_saved_image(self, image_id: str) -> None:
        self._enter("delete_saved_image", image_id)
        self.saved.pop(image_id, None)
        root = self.saved_root()
        if root is not None:
            await asyncio.to_thread(shutil.rmtree, root / image_id, ignore_errors=True)

    def crash(self, sandbox_id: str, *, disk_gone: bool = False) -> SandboxInfo:
        """The sandbox's machine dies underneath us (a test control): with its disk
        intact it is running and cold, and its next use boots it from its disk (a
        reboot); with ``disk_gone`` it is in error."""
        if disk_gone:
            info = self._transition("crash", sandbox_id, Op.LOST)
            return self._set(self.boxes[sandbox_id], problem="its disk /fake/rootfs is missing")
        info = self._transition("crash", sandbox_id, Op.CRASH)
        box = self.boxes[sandbox_id]
        box.reboot = info.state.status is Status.RUNNING  # not one in error already
        return self._set(box, has_snapshot=False)

    def _observe(self, box: _Box) -> SandboxInfo:
        if not box.lock.locked():  # a transition in progress notices a death itself
            self._notice_death(box)
        return box.info

    def thermal(self, sandbox_id: str) -> Thermal:
        box = self.boxes.get(sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        error = self.failures.get(("thermal", sandbox_id))
        if error is not None:
            raise error
        return self._observe(box).thermal

    def info(self, sandbox_id: str) -> SandboxInfo:
        box = self.boxes.get(sandbox_id)
        if box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return self._observe(box)

    def list(self) -> list[SandboxInfo]:
        return [self._observe(box) for box in list(self.boxes.values())]

    async def agent(self, sandbox_id: str) -> AgentClient:
        if self.agents_root is None:
            self._box("agent", sandbox_id)
            raise EngineUnavailable("the fake engine has no guest agent; use activity()")
        await self._act("agent", sandbox_id, Op.ENSURE_HOT)
        return self._client(self.boxes[sandbox_id])

    @staticmethod
    def _client(box: _Box) -> AgentClient:
        machine = box.machine
        assert machine is not None
        return AgentClient.unix_dir(machine.socket_dir, machine.token, connect_timeout=5)

    async def activity(self, sandbox_id: str) -> ActivityInfo:
        """What the sandbox's agent would answer; an activity source for the thermal manager.

        Refuses a sandbox that is not hot: asking would have to wake it. In ``agents``
        mode the agent answers, unless a test set the answer.
        """
        self.activity_queries.append(sandbox_id)
        box = self._box("activity", sandbox_id)
        if box.info.thermal is not Thermal.HOT:
            raise InvalidState(f"sandbox {sandbox_id} is {box.info.thermal}: asking would wake it")
        if sandbox_id not in self.activity_info and box.machine is not None:
            return await self._client(box).activity()
        return self.activity_info.get(sandbox_id, ActivityInfo(0.0))

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        box = self._box("export_state", sandbox_id)
        i = self._observe(box)
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
            STATE_KEY: None if i.last_boot is None else i.last_boot.to_json(),
        }

    async def adopt(self, state: Mapping[str, Any], *, hot: bool = True) -> SandboxInfo:
        """As a recovery that found no machine: what a lost node's sandbox is here."""
        return await self.import_state({**state, "alive": None})

    async def release(self, sandbox_id: str) -> dict[str, Any]:
        """Forget a cold sandbox here (another node adopts it)."""
        state = self.export_state(sandbox_id)
        if state.get("alive"):
            raise InvalidState(f"sandbox {sandbox_id} is not stopped; only a cold one moves")
        self.boxes.pop(sandbox_id, None)
        return state

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        sandbox_id = state.get("sandbox_id")
        if not isinstance(sandbox_id, str):
            raise InvalidState(f"state without a sandbox_id: {state!r}")
        self._enter("import_state", sandbox_id)
        if self.agents_root is not None:
            if not agents.sandbox_id_ok(sandbox_id):
                raise InvalidState(f"not a sandbox id: {sandbox_id!r}")
            return await self._adopt(sandbox_id)
        for key in ("cpus", "memory_mb"):
            value = state.get(key, 1)
            if type(value) is not int:
                raise InvalidState(f"{key} must be an int, got {type(value).__name__} {value!r}")
        for key in ("keep_hot", "has_snapshot"):
            if type(state.get(key, False)) is not bool:
                raise InvalidState(f"{key} must be a bool, got {state.get(key)!r}")
        alive = state.get("alive")
        has_snapshot = bool(state.get("has_snapshot", False))
        disk = state.get("disk")  # "intact" or "gone": what a real engine checks on disk
        problem = None
        if alive:
            found = Found.RUNNING if Thermal(alive) is Thermal.HOT else Found.PAUSED
        elif has_snapshot:
            found = Found.SNAPSHOT
        elif disk == "intact":
            found = Found.DISK
        elif disk == "gone":
            found, problem = Found.GONE, "its disk /fake/rootfs is missing"
        else:
            found = Found.NOTHING
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
            last_boot=LastBoot.from_json(state.get("last_boot")),
            problem=problem,
        )
        if alive or has_snapshot or disk:
            self.boxes[sandbox_id] = _Box(info, reboot=found is Found.DISK)
        return info

    async def _adopt(self, sandbox_id: str) -> SandboxInfo:
        """``agents`` mode: what is left of the sandbox under our root, looked at afresh."""
        existing = self.boxes.get(sandbox_id)
        if existing is not None:
            return self._observe(existing)
        assert self.agents_root is not None
        root = agents.sandbox_dir(self.agents_root, sandbox_id)
        machine = await asyncio.to_thread(agents.Machine.load, root)
        if machine is None:
            spec = SandboxSpec(sandbox_id=sandbox_id, name=sandbox_id)
            state = ADOPTED[Found.NOTHING]
        else:
            spec = machine.spec
            if machine.running:
                paused = agents.stopped(_pid(machine))
                state = ADOPTED[Found.PAUSED if paused else Found.RUNNING]
            else:
                await asyncio.to_thread(agents.shutdown, machine)  # stray processes
                state = FILES_ONLY
        info = SandboxInfo(
            sandbox_id=sandbox_id,
            name=spec.name,
            engine=self.name,
            image=spec.image,
            status=state.status,
            thermal=state.thermal,
            ip=None,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            keep_hot=spec.keep_hot,
            capabilities=AGENT_CAPABILITIES,
            runtime=spec.runtime,
        )
        self.boxes[sandbox_id] = _Box(info, machine)
        return info

    async def prepare(self, spec: SandboxSpec) -> None:
        spec.validate()
        self.prepared.append(spec)

    async def cleanup_orphans(self) -> list[str]:
        self.calls.append(("cleanup_orphans", ""))
        if self.agents_root is None:
            return []
        removed: list[str] = []
        for sandbox_id in await asyncio.to_thread(_list_ids, self.agents_root):
            if sandbox_id not in self.boxes:
                removed += await asyncio.to_thread(agents.remove, self.agents_root, sandbox_id)
        return removed

    async def delete_volume(self, volume_id: str) -> None:
        self.calls.append(("delete_volume", volume_id))

    async def close(self) -> None:
        # Like QEMU VMs, agents outlive the engine: the next one re-adopts them.
        self.closed = True


def _pid(machine: agents.Machine) -> int:
    if machine.pid is None:
        raise InvalidState(f"sandbox {machine.spec.sandbox_id} has no running agent")
    return machine.pid


def _list_ids(root: Path) -> list[str]:
    return list(agents.sandbox_ids(root))


def _bytes_under(root: Path) -> int:
    """What a saved image of files occupies: the sizes of the files under ``root``."""
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
