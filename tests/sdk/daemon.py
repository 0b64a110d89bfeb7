"""A real kiln daemon for SDK and CLI tests: real HTTP on 127.0.0.1, real SQLite, real agents.

The daemon is :func:`kiln.server.create_app` served by uvicorn in a thread.
Its engine is the fake engine from ``tests/fakes`` with one change: every
sandbox runs a real test-mode guest agent (``python -m kiln.guest
--test-mode``, a subprocess on Unix sockets) whose config carries the
sandbox's env and init script, so exec, files, sessions and shells go all the
way down. The tests are about the SDK and the CLI, the layers above the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fakes.engine import FakeEngine
from kiln.agent_client import AgentClient
from kiln.config import Config
from kiln.engine.base import SandboxInfo, SandboxSpec
from kiln.engine.errors import SandboxNotFound
from kiln.server import Services, create_app
from kiln.store import SecretBox, Store

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class _Agent:
    proc: asyncio.subprocess.Process
    socket_dir: Path
    token: str


class AgentEngine(FakeEngine):
    """:class:`FakeEngine` whose sandboxes each run a real test-mode guest agent."""

    def __init__(self, root: Path) -> None:
        super().__init__("fake")
        self.root = root
        self.agents: dict[str, _Agent] = {}

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        info = await super().create(spec)
        work, config, socket_dir = _prepare(self.root, spec)
        token = secrets.token_hex(16)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kiln.guest",
            "--test-mode",
            "--socket-dir",
            str(socket_dir),
            "--token",
            token,
            "--config",
            str(config),
            "--workdir",
            str(work),
            "--no-sync",
            "--log-level",
            "warning",
            env=dict(os.environ, PYTHONPATH=str(SRC)),
            start_new_session=True,
        )
        self.agents[spec.sandbox_id] = _Agent(proc, socket_dir, token)
        await AgentClient.unix_dir(socket_dir, token).wait_ready(timeout=15)
        return info

    async def agent(self, sandbox_id: str) -> AgentClient:
        await self.ensure_hot(sandbox_id)
        agent = self.agents.get(sandbox_id)
        if agent is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return AgentClient.unix_dir(agent.socket_dir, agent.token)

    async def destroy(self, sandbox_id: str) -> None:
        await super().destroy(sandbox_id)
        agent = self.agents.pop(sandbox_id, None)
        if agent is not None:
            await _stop(agent)

    async def close(self) -> None:
        for sandbox_id in list(self.agents):
            await _stop(self.agents.pop(sandbox_id))
        await super().close()


def _prepare(root: Path, spec: SandboxSpec) -> tuple[Path, Path, Path]:
    """The sandbox's work dir, its agent config (env, init) and a socket dir."""
    work = root / "sandboxes" / spec.sandbox_id
    work.mkdir(parents=True)
    config = work / "config.json"
    config.write_text(json.dumps({"env": dict(spec.env), "init": spec.init}))
    # Unix socket paths are limited to 108 bytes: keep them short, under /tmp.
    socket_dir = Path(f"/tmp/kt-{secrets.token_hex(4)}")
    socket_dir.mkdir()
    return work, config, socket_dir


async def _stop(agent: _Agent) -> None:
    if agent.proc.returncode is None:
        os.killpg(agent.proc.pid, signal.SIGKILL)  # the agent and every child it started
        await agent.proc.wait()
    shutil.rmtree(agent.socket_dir, ignore_errors=True)


@dataclass
class Daemon:
    url: str
    token: str
    data_dir: Path
    store: Store
    engine: AgentEngine


@contextmanager
def running_daemon(data_dir: Path) -> Iterator[Daemon]:
    """Serve the API on a free port of 127.0.0.1 until the block ends."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.open(data_dir / "kiln.db", secret_box=SecretBox(data_dir / "secret.key"))
    _, token = store.create_user("tester")
    engine = AgentEngine(data_dir)
    config = Config(data_dir=data_dir, listen="127.0.0.1:0")
    app = create_app(Services(store=store, engine=engine, config=config))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    loop = asyncio.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=serve, name="kiln-test-daemon", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test daemon did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Daemon(f"http://127.0.0.1:{port}", token, data_dir, store, engine)
    finally:
        server.should_exit = True
        thread.join(15)
        loop.run_until_complete(engine.close())
        loop.close()
        store.close()
