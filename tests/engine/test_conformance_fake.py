"""The engine conformance suite against the fake engine with real agents.

``FakeEngine(agents=ROOT)`` runs each sandbox as a test-mode guest agent process
(:mod:`fakes.agents`): no VM, but real processes, files, TTYs and TCP on this
host's loopback. A home is a root directory of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes import agents
from fakes.engine import FakeEngine
from kiln.engine.base import Engine, SandboxSpec
from kiln.engine.testing import MAIN_HOME, EngineConformance

pytestmark = [pytest.mark.timeout(300)]


def _fake(engine: Engine) -> FakeEngine:
    assert isinstance(engine, FakeEngine), engine
    return engine


class FakeKit:
    has_ip = False
    known_failures: dict[str, str] = {}

    def __init__(self, base: Path) -> None:
        self.base = base

    def root(self, home: str) -> Path:
        return self.base / home

    @contextlib.asynccontextmanager
    async def engine(self, home: str = MAIN_HOME) -> AsyncIterator[Engine]:
        engine = FakeEngine(agents=self.root(home))
        try:
            yield engine
        finally:
            await engine.close()

    def spec(self, sandbox_id: str, **overrides: Any) -> SandboxSpec:
        fields: dict[str, Any] = {"sandbox_id": sandbox_id, "name": sandbox_id, **overrides}
        return SandboxSpec(**fields)

    def workdir(self, engine: Engine, sandbox_id: str) -> str:
        return str(_fake(engine).workdir(sandbox_id))

    async def kill_machine(self, engine: Engine, sandbox_id: str) -> None:
        await asyncio.to_thread(agents.kill_all, _fake(engine).machine_marker(sandbox_id))

    async def lose_disk(self, engine: Engine, sandbox_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, _fake(engine).workdir(sandbox_id))

    async def leftovers(self, engine: Engine, sandbox_id: str) -> list[str]:
        root = _fake(engine).agents_root
        assert root is not None
        return await asyncio.to_thread(agents.leftovers, root, sandbox_id)

    def close(self) -> None:
        """Kill whatever a failed test left running in any home."""
        if self.base.is_dir():
            for home in self.base.iterdir():
                agents.kill_everything(home)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKit]:
    kit = FakeKit(tmp_path_factory.mktemp("fake-engine"))
    try:
        yield kit
    finally:
        kit.close()


class TestFakeEngineConformance(EngineConformance):
    pass
