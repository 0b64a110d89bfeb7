"""The Docker engine's side of the engine conformance suite (:mod:`kiln.engine.testing`).

Every home is an engine installation of its own (state directory, bridge and
subnet, owner label) on the session's private dockerd, so a ``cleanup_orphans``
in one never sees another's containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kiln.engine.base import Engine, SandboxSpec
from kiln.engine.docker import Dockerd, DockerEngine
from kiln.engine.docker.record import container_name
from kiln.engine.docker.testing import engine_config
from kiln.engine.testing import MAIN_HOME


def _docker(engine: Engine) -> DockerEngine:
    assert isinstance(engine, DockerEngine), engine
    return engine


class DockerKit:
    has_ip = True
    known_failures: dict[str, str] = {}

    def __init__(self, dockerd: Dockerd, scratch: Path, runtime: str, first_subnet: int) -> None:
        self._dockerd = dockerd
        self._scratch = scratch
        self._runtime = runtime
        self._first_subnet = first_subnet
        self._homes: dict[str, int] = {}

    def _config_for(self, home: str) -> Any:
        index = self._homes.setdefault(home, len(self._homes))
        return engine_config(
            self._scratch / home,
            self._dockerd,
            bridge=f"kc-{self._runtime}-{index}",
            subnet=f"10.213.{self._first_subnet + index}.0/24",
            runtime=self._runtime,
        )

    @contextlib.asynccontextmanager
    async def engine(self, home: str = MAIN_HOME) -> AsyncIterator[Engine]:
        engine = DockerEngine(self._config_for(home))
        try:
            yield engine
        finally:
            await engine.close()

    def spec(self, sandbox_id: str, **overrides: Any) -> SandboxSpec:
        fields: dict[str, Any] = {
            "sandbox_id": sandbox_id,
            "name": sandbox_id,
            "memory_mb": 256,
            "engine": "docker",
            "runtime": self._runtime,
            **overrides,
        }
        return SandboxSpec(**fields)

    def workdir(self, engine: Engine, sandbox_id: str) -> str:
        return "/workspace"

    async def kill_machine(self, engine: Engine, sandbox_id: str) -> None:
        docker = _docker(engine)
        attrs = await docker.inspect(sandbox_id)
        os.kill(attrs["State"]["Pid"], signal.SIGKILL)
        for _ in range(400):
            attrs = await docker.inspect(sandbox_id)
            if not attrs["State"]["Running"]:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"the container of {sandbox_id} still runs after SIGKILL")

    async def lose_disk(self, engine: Engine, sandbox_id: str) -> None:
        # A container's files live in its writable layer: gone with the container.
        client = await _docker(engine).docker_client()
        await asyncio.to_thread(client.api.remove_container, container_name(sandbox_id), force=True)

    async def leftovers(self, engine: Engine, sandbox_id: str) -> list[str]:
        docker = _docker(engine)
        client = await docker.docker_client()
        name = container_name(sandbox_id)
        found = [
            f"container {c.name} ({c.status})"
            for c in await asyncio.to_thread(
                client.containers.list, all=True, filters={"name": f"^{name}$"}
            )
        ]
        directory = docker.config.sandboxes_dir / sandbox_id
        if directory.exists():
            found.append(f"directory {directory}")
        found += [
            f"address {addr}" for addr, owner in docker.pool.in_use().items() if owner == sandbox_id
        ]
        return found
