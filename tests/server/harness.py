"""The server test harness: a fake engine with real agents, and the API on real HTTP.

:class:`AgentEngine` is :class:`tests.fakes.engine.FakeEngine` whose ``agent()``
returns a real :class:`~kiln.agent_client.AgentClient` to a real test-mode
guest agent subprocess (one per sandbox, with the sandbox's env, init script
and token), so exec, files, sessions and shells are real; only the VM is
fake. Like a VM, an agent survives ``close()`` (the daemon going away), and
``import_state`` re-adopts one that still answers.

:class:`LiveServer` runs :func:`kiln.server.create_app` under uvicorn on an
ephemeral 127.0.0.1 port in a background thread with its own event loop,
over a real SQLite store (or the PostgreSQL database ``store_target`` names).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from fakes.engine import FakeEngine
from kiln.agent_client import AgentClient, AgentError
from kiln.config import Config, ThermalSettings
from kiln.engine.base import VM_CAPABILITIES, Capabilities, SandboxInfo, SandboxSpec
from kiln.engine.states import Action, Op, from_disk, plan
from kiln.server import Services, create_app
from kiln.server.daemon import KEEP_ALIVE_S, bind_socket
from kiln.store import SecretBox, Store

T = TypeVar("T")

SOCK_ROOT = Path(os.environ.get("KILN_TEST_SOCKDIR", "/tmp"))
SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class _Agent:
    pid: int  # leader of its own process group (the agent and everything it started)
    socket_dir: Path
    token: str
    workdir: Path


def spawn_agent(socket_dir: Path, token: str, config: Path, workdir: Path) -> int:
    """Start a test-mode agent in its own session; return its pid once it listens."""
    proc = subprocess.Popen(
        [
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
            str(workdir),
            "--no-sync",
            # Orphans (setsid X &) stay below the agent, as in a VM, so that
            # kill_agent finds them.
            "--reap-orphans",
            "--log-level",
            "warning",
        ],
        env=dict(os.environ, PYTHONPATH=str(SRC)),
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while not ((socket_dir / "control.sock").exists() and (socket_dir / "forward.sock").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("test-mode agent did not start")
        time.sleep(0.01)
    _children.append(proc)
    return proc.pid


# Popen objects of agents started by this process, kept so they are reaped.
_children: list[subprocess.Popen[bytes]] = []


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {p for p, parent in parents.items() if parent in frontier} - found
        found |= children
        frontier = children
    return found


def kill_agent(pid: int) -> None:
    """Kill an agent and everything it started: its process group, and the background
    processes that have sessions of their own (a VM's destroy takes those too)."""
    below = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    for proc in list(_children):
        if proc.pid == pid:
            proc.wait()
            _children.remove(proc)


class AgentEngine(FakeEngine):
    """FakeEngine + one real test-mode agent process per sandbox.

    ``lazy``: start a sandbox's agent on its first ``agent()`` call instead of at
    create (many sandboxes that are only listed cost no processes).
    ``config_in_workdir``: write the agent's config as ``config.json`` inside the
    sandbox's work dir (an SDK test lists that dir and expects it) instead of beside it.
    ``capabilities``: what every sandbox reports; without snapshots (as the Docker
    engine's) the states follow the table without snapshots, and a stop ends the
    sandbox's agent and everything it started but keeps its work dir.
    """

    def __init__(
        self,
        root: Path,
        *,
        lazy: bool = False,
        name: str = "fake",
        config_in_workdir: bool = False,
        capabilities: Capabilities = VM_CAPABILITIES,
    ) -> None:
        super().__init__(name)
        self.capabilities = capabilities
        self.root = root
        self.lazy = lazy
        self.config_in_workdir = config_in_workdir
        self.specs: dict[str, SandboxSpec] = {}
        self.agents: dict[str, _Agent] = {}
        self._starting: dict[str, asyncio.Lock] = {}

    # --- agents -----------------------------------------------------------------------

    def workdir(self, sandbox_id: str) -> Path:
        return self.root / "work" / sandbox_id

    def saved_root(self) -> Path | None:
        # Per engine name: engines of one daemon may share a root.
        return self.root / "saved" / self.name

    def files_of(self, sandbox_id: str) -> Path | None:
        return self.workdir(sandbox_id)

    async def _start_agent(self, sandbox_id: str) -> _Agent:
        lock = self._starting.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            existing = self.agents.get(sandbox_id)
            if existing is not None:
                return existing
            spec = self.specs.get(sandbox_id)
            token = secrets.token_hex(16)
            sock_dir = SOCK_ROOT / f"ks-{secrets.token_hex(4)}"
            sock_dir.mkdir()
            work = self.workdir(sandbox_id)
            work.mkdir(parents=True, exist_ok=True)
            config: dict[str, Any] = {"token": token, "env": dict(spec.env) if spec else {}}
            if spec is not None and spec.init:
                config["init"] = spec.init
            if self.config_in_workdir:
                cfg_path = work / "config.json"
            else:
                cfg_path = work.parent / f"{sandbox_id}.config.json"
            cfg_path.write_text(json.dumps(config))
            pid = await asyncio.to_thread(spawn_agent, sock_dir, token, cfg_path, work)
            with open(self.root / "agents.pids", "a") as f:  # noqa: ASYNC230 -- tiny append
                f.write(f"{pid}\n")
            agent = _Agent(pid, sock_dir, token, work)
            self.agents[sandbox_id] = agent
            return agent

    def _client(self, agent: _Agent) -> AgentClient:
        return AgentClient.unix_dir(agent.socket_dir, agent.token, connect_timeout=5)

    def _stop_agent(self, sandbox_id: str) -> None:
        agent = self.agents.pop(sandbox_id, None)
        if agent is None:
            return
        kill_agent(agent.pid)
        shutil.rmtree(agent.socket_dir, ignore_errors=True)

    def stop_all_agents(self) -> None:
        for sandbox_id in list(self.agents):
            self._stop_agent(sandbox_id)

    # --- the engine -------------------------------------------------------------------

    def _transition(self, method: str, sandbox_id: str, op: Op) -> SandboxInfo:
        box = self._box(method, sandbox_id)
        snapshots = self.capabilities.snapshots
        step = plan(op, box.info.state, sandbox_id, snapshots=snapshots)
        if box.reboot:
            step = from_disk(step)
            box.reboot = step.action is not Action.BOOT
        return self._apply(box, step)

    def crash(self, sandbox_id: str, *, disk_gone: bool = False) -> SandboxInfo:
        """The "VM" dies: its agent and everything it started with it; its work dir
        (its files) stays unless ``disk_gone``."""
        info = super().crash(sandbox_id, disk_gone=disk_gone)
        self._stop_agent(sandbox_id)
        return info

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        info = await super().create(spec)
        info = self._set(self.boxes[spec.sandbox_id], capabilities=self.capabilities)
        self.specs[spec.sandbox_id] = spec
        if spec.snapshot is not None:
            await self.restore_saved_files(spec.snapshot, self.workdir(spec.sandbox_id))
        if not self.lazy:
            try:
                await self._start_agent(spec.sandbox_id)
            except BaseException:
                self.boxes.pop(spec.sandbox_id, None)
                raise
        return info

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        if self.capabilities.snapshots:
            return await super().stop(sandbox_id)
        # No cold step without snapshots, only the user's stop (as in the Docker engine):
        # its processes end, its work dir (its files) stays.
        info = self._transition("stop", sandbox_id, Op.STOP)
        self._stop_agent(sandbox_id)
        return info

    async def destroy(self, sandbox_id: str) -> None:
        await super().destroy(sandbox_id)
        self._stop_agent(sandbox_id)
        self.specs.pop(sandbox_id, None)

    async def agent(self, sandbox_id: str) -> AgentClient:
        self._transition("agent", sandbox_id, Op.ENSURE_HOT)
        return self._client(await self._start_agent(sandbox_id))

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        state = super().export_state(sandbox_id)
        agent = self.agents.get(sandbox_id)
        spec = self.specs.get(sandbox_id)
        if agent is not None:
            state["agent"] = {
                "pid": agent.pid,
                "socket_dir": str(agent.socket_dir),
                "token": agent.token,
                "workdir": str(agent.workdir),
            }
        if spec is not None:
            state["env"] = dict(spec.env)
        return state

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        info = await super().import_state(state)
        if info.sandbox_id in self.boxes:
            info = self._set(self.boxes[info.sandbox_id], capabilities=self.capabilities)
        env = state.get("env")
        if isinstance(env, Mapping):
            self.specs[info.sandbox_id] = SandboxSpec(
                sandbox_id=info.sandbox_id, name=info.name, env=dict(env)
            )
        raw = state.get("agent")
        if isinstance(raw, Mapping) and info.sandbox_id in self.boxes:
            agent = _Agent(
                int(raw["pid"]),
                Path(raw["socket_dir"]),
                str(raw["token"]),
                Path(raw["workdir"]),
            )
            try:
                await self._client(agent).activity()
            except AgentError:
                pass  # the "VM" did not survive; the agent restarts on first use
            else:
                self.agents[info.sandbox_id] = agent
        return info

    async def close(self) -> None:
        # Like QEMU VMs, the agents outlive the daemon; tests stop them explicitly.
        await super().close()


def kill_recorded_agents(engine_root: Path) -> None:
    """Kill every agent an :class:`AgentEngine` rooted there ever started (any process)."""
    pids = engine_root / "agents.pids"
    if pids.exists():
        for line in pids.read_text().split():
            kill_agent(int(line))


class TouchRecorder:
    """Stands in for the thermal manager: records host-side activity."""

    def __init__(self) -> None:
        self.touched: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def touch(self, sandbox_id: str, when: float | None = None) -> None:
        self.touched[sandbox_id] = when or 0.0
        self.count[sandbox_id] = self.count.get(sandbox_id, 0) + 1

    def last_touch(self, sandbox_id: str) -> float | None:
        return self.touched.get(sandbox_id)


@dataclass
class LiveServer:
    """The API over real HTTP on 127.0.0.1, in a thread with its own event loop."""

    root: Path
    lazy_agents: bool = False
    max_upload_bytes: int = 100 * 1024 * 1024
    url: str = ""
    store: Store = field(init=False)
    #: Builds the engine (default: an :class:`AgentEngine` under ``root/engine``).
    engine_factory: Callable[[Path], Any] | None = None
    #: Data dir settings for the engine and the API (``Config`` overrides).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    #: The store to open (a postgresql:// URL); None: SQLite in the data dir.
    store_target: str | None = None
    engine: Any = field(init=False)
    services: Services = field(init=False)
    thermal: TouchRecorder = field(default_factory=TouchRecorder)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def start(self) -> LiveServer:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(
            self.store_target or data / "kiln.db", secret_box=SecretBox(data / "secret.key")
        )
        if self.engine_factory is None:
            self.engine = AgentEngine(self.root / "engine", lazy=self.lazy_agents)
        else:
            self.engine = self.engine_factory(data)
        config = Config(
            data_dir=data,
            thermal=ThermalSettings(),
            max_upload_bytes=self.max_upload_bytes,
            **self.config_overrides,
        )
        self.services = Services(
            store=self.store, engine=self.engine, config=config, thermal=self.thermal
        )
        self._thread = threading.Thread(target=self._main, name="kiln-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("test server did not start")
        if self._error is not None:
            raise RuntimeError("test server failed") from self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = bind_socket("127.0.0.1", 0)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        app = create_app(self.services)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                lifespan="off",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=2,
                timeout_keep_alive=KEEP_ALIVE_S,
                server_header=False,
                proxy_headers=False,
            )
        )
        self._server = server
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._ready.set()
        try:
            await task
        finally:
            await app.state.node_pools.aclose()  # a cluster node's connections to others
            sock.close()

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop (where the engine lives) and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(timeout)

    def stop(self) -> None:
        if not isinstance(self.engine, AgentEngine) and self._loop is not None:
            self.call(self.engine.close)  # on its own loop, while that still runs
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if isinstance(self.engine, AgentEngine):
            self.engine.stop_all_agents()
        self.store.close()

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")
