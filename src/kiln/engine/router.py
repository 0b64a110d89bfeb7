"""Several engines as one: the daemon runs QEMU and Docker sandboxes side by side.

A create goes to the engine its spec names (``SandboxSpec.engine``, else the
default); every later call goes to the engine that holds the sandbox. An
engine that cannot run here stays in the table as an :class:`Unavailable`,
so asking for it answers with the reason (503) instead of "unknown engine".

Exported state carries the engine's name (``"engine"``), so recovery hands
each sandbox back to the engine that made it; states saved before there was a
router have none, and the store's row says whose they are.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Mapping
from typing import Any

from kiln.agent_client import AgentClient

from .base import Engine, SandboxInfo, SandboxSpec, SavedImage, Thermal
from .errors import EngineError, EngineUnavailable, InvalidSpec, SandboxNotFound

ENGINE_KEY = "engine"


class Unavailable:
    """Stands in for an engine that cannot run here: every operation says why (503)."""

    def __init__(self, reason: str, name: str = "none") -> None:
        self.name = name
        self.reason = reason

    def _no(self) -> EngineUnavailable:
        return EngineUnavailable(self.reason)

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        raise self._no()

    async def destroy(self, sandbox_id: str) -> None:
        raise self._no()

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        raise self._no()

    async def start(self, sandbox_id: str) -> SandboxInfo:
        raise self._no()

    async def pause(self, sandbox_id: str) -> None:
        raise self._no()

    async def resume(self, sandbox_id: str) -> None:
        raise self._no()

    async def ensure_hot(self, sandbox_id: str) -> None:
        raise self._no()

    async def fork(self, source_id: str, spec: SandboxSpec) -> SandboxInfo:
        raise self._no()

    def thermal(self, sandbox_id: str) -> Thermal:
        raise SandboxNotFound(sandbox_id)

    def info(self, sandbox_id: str) -> SandboxInfo:
        raise SandboxNotFound(sandbox_id)

    def list(self) -> builtins.list[SandboxInfo]:
        return []

    async def agent(self, sandbox_id: str) -> AgentClient:
        raise self._no()

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        raise SandboxNotFound(sandbox_id)

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        raise self._no()

    async def adopt(self, state: Mapping[str, Any], *, hot: bool = True) -> SandboxInfo:
        raise self._no()

    async def release(self, sandbox_id: str) -> dict[str, Any]:
        raise SandboxNotFound(sandbox_id)

    async def prepare(self, spec: SandboxSpec) -> None:
        raise self._no()

    async def cleanup_orphans(self) -> builtins.list[str]:
        return []

    async def delete_volume(self, volume_id: str) -> None:
        return None  # nothing of it can exist here

    async def save_image(self, sandbox_id: str, image_id: str) -> SavedImage:
        raise self._no()

    async def delete_saved_image(self, image_id: str) -> None:
        return None  # nothing of it can exist here

    async def close(self) -> None:
        return None


class Engines:
    """An :class:`~.base.Engine` that routes each sandbox to one of several engines."""

    def __init__(self, engines: Mapping[str, Engine], default: str) -> None:
        if default not in engines:
            raise ValueError(f"default engine {default!r} is not one of {sorted(engines)}")
        self._engines = dict(engines)
        self._default = default
        self._owner: dict[str, str] = {}
        #: The default engine's name (what ``/health`` reports).
        self.name = default

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._engines)

    def get(self, name: str) -> Engine:
        """The engine called ``name`` (InvalidSpec if there is none of that name)."""
        engine = self._engines.get(name)
        if engine is None:
            raise InvalidSpec(f"unknown engine {name!r} (one of {', '.join(self._engines)})")
        return engine

    def available(self) -> dict[str, str | None]:
        """Each engine's name → None if it can run here, else why not."""
        return {
            n: e.reason if isinstance(e, Unavailable) else None for n, e in self._engines.items()
        }

    def engine_of(self, sandbox_id: str) -> Engine:
        name = self._owner.get(sandbox_id)
        if name is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return self._engines[name]

    # -- routed by the spec --------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        name = spec.engine or self._default
        engine = self.get(name)
        spec = dataclasses.replace(spec, engine=name)
        self._owner[spec.sandbox_id] = name
        try:
            return await engine.create(spec)
        except BaseException:
            self._owner.pop(spec.sandbox_id, None)
            raise

    async def prepare(self, spec: SandboxSpec) -> None:
        name = spec.engine or self._default
        await self.get(name).prepare(dataclasses.replace(spec, engine=name))

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        name = state.get(ENGINE_KEY) or self._default
        if not isinstance(name, str):
            raise EngineError(f"engine state names no engine: {state!r}")
        info = await self.get(name).import_state(state)
        self._owner[info.sandbox_id] = name
        return info

    async def adopt(self, state: Mapping[str, Any], *, hot: bool = True) -> SandboxInfo:
        name = state.get(ENGINE_KEY) or self._default
        if not isinstance(name, str):
            raise EngineError(f"engine state names no engine: {state!r}")
        info = await self.get(name).adopt(state, hot=hot)
        self._owner[info.sandbox_id] = name
        return info

    # -- routed by the sandbox -----------------------------------------------------------

    async def destroy(self, sandbox_id: str) -> None:
        name = self._owner.get(sandbox_id)
        if name is None:
            return  # idempotent, as every engine's destroy
        await self._engines[name].destroy(sandbox_id)
        self._owner.pop(sandbox_id, None)

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        return await self.engine_of(sandbox_id).stop(sandbox_id)

    async def start(self, sandbox_id: str) -> SandboxInfo:
        return await self.engine_of(sandbox_id).start(sandbox_id)

    async def pause(self, sandbox_id: str) -> None:
        await self.engine_of(sandbox_id).pause(sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await self.engine_of(sandbox_id).resume(sandbox_id)

    async def ensure_hot(self, sandbox_id: str) -> None:
        await self.engine_of(sandbox_id).ensure_hot(sandbox_id)

    async def fork(self, source_id: str, spec: SandboxSpec) -> SandboxInfo:
        name = self._owner.get(source_id)
        if name is None:
            raise SandboxNotFound(f"no sandbox {source_id!r}")
        spec = dataclasses.replace(spec, engine=name)
        self._owner[spec.sandbox_id] = name
        try:
            return await self._engines[name].fork(source_id, spec)
        except BaseException:
            self._owner.pop(spec.sandbox_id, None)
            raise

    async def save_image(self, sandbox_id: str, image_id: str) -> SavedImage:
        return await self.engine_of(sandbox_id).save_image(sandbox_id, image_id)

    async def delete_saved_image(self, image_id: str) -> None:
        # The saved image is the engine's that saved it; the others have none.
        for engine in self._engines.values():
            await engine.delete_saved_image(image_id)

    def thermal(self, sandbox_id: str) -> Thermal:
        return self.engine_of(sandbox_id).thermal(sandbox_id)

    def info(self, sandbox_id: str) -> SandboxInfo:
        return self.engine_of(sandbox_id).info(sandbox_id)

    def list(self) -> builtins.list[SandboxInfo]:
        return [info for engine in self._engines.values() for info in engine.list()]

    async def agent(self, sandbox_id: str) -> AgentClient:
        return await self.engine_of(sandbox_id).agent(sandbox_id)

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        name = self._owner.get(sandbox_id)
        if name is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return {**self._engines[name].export_state(sandbox_id), ENGINE_KEY: name}

    async def release(self, sandbox_id: str) -> dict[str, Any]:
        name = self._owner.get(sandbox_id)
        if name is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        state = await self._engines[name].release(sandbox_id)
        self._owner.pop(sandbox_id, None)
        return {**state, ENGINE_KEY: name}

    # -- every engine --------------------------------------------------------------------

    async def cleanup_orphans(self) -> builtins.list[str]:
        removed: builtins.list[str] = []
        for name, engine in self._engines.items():
            removed += [f"{name}: {item}" for item in await engine.cleanup_orphans()]
        return removed

    async def delete_volume(self, volume_id: str) -> None:
        # A volume lives in the engine that first attached it; the others have none.
        for engine in self._engines.values():
            await engine.delete_volume(volume_id)

    async def close(self) -> None:
        errors: builtins.list[EngineError] = []
        for engine in self._engines.values():
            try:
                await engine.close()
            except EngineError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


__all__ = ["ENGINE_KEY", "Engines", "Unavailable"]
