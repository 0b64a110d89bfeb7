"""The Docker engine's side of the engine conformance suite (:mod:`kiln.engine.testing`).

Every home is an engine installation of its own (state directory, bridge and
subnet, owner label) on the session's private dockerd, so a ``cleanup_orphans``
in one never sees another's containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from kiln.engine.base import Engine, SandboxInfo, SandboxSpec
from kiln.engine.docker import Dockerd, DockerEngine
from kiln.engine.docker.record import container_name
from kiln.engine.docker.testing import engine_config
from kiln.engine.errors import InvalidSpec
from kiln.engine.testing import MAIN_HOME


def _docker(engine: Engine) -> DockerEngine:
    assert isinstance(engine, DockerEngine), engine
    return engine


#: How long a create of the pooled kit waits for a member before going on without.
POOL_WAIT = 20.0


def _from_the_pool(
    engine: DockerEngine, kit: DockerKit
) -> Callable[[SandboxSpec], Awaitable[SandboxInfo]]:
    """``engine.create`` that first starts the pool of the spec's shape and waits for a
    member when the spec fits it, so that the suite's sandboxes come from the pool."""
    create = engine.create

    async def waiting_create(spec: SandboxSpec) -> SandboxInfo:
        runtime = spec.runtime or engine.config.runtime
        pool = engine.warm_pool
        with contextlib.suppress(InvalidSpec):  # the suite's bad specs: no pool of those
            spec.validate()
            pool.start(spec, runtime)
        deadline = time.monotonic() + POOL_WAIT
        while pool.fits(spec, runtime) and not pool.ready(spec, runtime):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        before = pool.claims
        info = await create(spec)
        kit.claims += pool.claims - before
        return info

    return waiting_create


class DockerKit:
    has_ip = True
    known_failures: dict[str, str] = {}

    def __init__(
        self,
        dockerd: Dockerd,
        scratch: Path,
        runtime: str,
        first_subnet: int,
        *,
        pool_size: int = 0,
    ) -> None:
        self._dockerd = dockerd
        self._scratch = scratch
        self._runtime = runtime
        self._first_subnet = first_subnet
        self._homes: dict[str, int] = {}
        #: Engines with a warm pool of the suite's shape: creates take members when
        #: one is ready and the ordinary path when not, so the suite runs on both.
        self._pool_size = pool_size
        #: Creates served from the pool, in every engine of this kit.
        self.claims = 0

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
        config = dataclasses.replace(self._config_for(home), pool_size=self._pool_size)
        engine = DockerEngine(config)
        try:
            if self._pool_size:
                # The pool starts at the first create, not here: a member made before a
                # test's import_state could take the address of the sandbox it re-adopts
                # (the daemon, too, recovers its sandboxes before it fills the pool).
                setattr(engine, "create", _from_the_pool(engine, self))  # noqa: B010
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
