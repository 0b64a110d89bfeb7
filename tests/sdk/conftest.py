"""A daemon for the whole SDK test session, and a client and a fresh sandbox per test.

The daemon is the server tests' :class:`~server.harness.LiveServer`: the API on
real HTTP over a real SQLite store, and an :class:`~server.harness.AgentEngine`
whose sandboxes each run a real test-mode guest agent, so exec, files, sessions
and shells go all the way down. The CLI tests use the same fixtures.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from kiln.engine.base import Capabilities, Engine
from kiln.engine.router import Engines, Unavailable
from kiln.sdk import AsyncKiln, Kiln, NotFound, Sandbox
from server.harness import AgentEngine, LiveServer, kill_recorded_agents
from server.upstream import Upstream

#: What the Docker engine's sandboxes can do (and the two-engine daemon's ``docker``).
CONTAINER_CAPABILITIES = Capabilities(pause=True, snapshots=False)
#: Why the ``docker`` engine of :func:`running_two_engine_daemon` without Docker
#: cannot run (as ``/health`` says).
NO_DOCKER = "no Docker engine here: dockerd is not installed"


@dataclass
class Daemon:
    """A running :class:`LiveServer` and the API key of its one user."""

    server: LiveServer
    token: str

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def data_dir(self) -> Path:
        """The daemon's data dir (``kiln.db``), for the CLI's local commands."""
        return self.server.services.config.data_dir

    def visit(self, url: str, path: str = "/") -> httpx.Response:
        """GET ``path`` at a published ``url`` as a browser on this host would: to
        the daemon's own address, with ``url``'s host in ``Host`` (``*.localhost``
        is this host) and no API key."""
        with httpx.Client(base_url=self.url, timeout=30) as anonymous:
            return anonymous.get(path, headers={"Host": urlsplit(url).netloc})

    def workdir(self, sandbox_id: str) -> Path:
        """The sandbox's working directory (test-mode agents share the host filesystem)."""
        engine = self.server.engine
        if isinstance(engine, Engines):
            engine = engine.engine_of(sandbox_id)
        assert isinstance(engine, AgentEngine)
        return engine.workdir(sandbox_id)


@contextmanager
def running_daemon(root: Path) -> Iterator[Daemon]:
    """Serve the API on a free port of 127.0.0.1 until the block ends."""
    server = LiveServer(
        root,
        engine_factory=lambda data: AgentEngine(data.parent / "engine", config_in_workdir=True),
    ).start()
    try:
        _, token = server.store.create_user("tester")
        yield Daemon(server, token)
    finally:
        server.stop()


@contextmanager
def running_two_engine_daemon(root: Path, *, docker: bool = True) -> Iterator[Daemon]:
    """The API over the daemon's real engine router (:class:`~kiln.engine.router.Engines`):
    ``qemu`` (the default) an :class:`AgentEngine` with snapshots, ``docker`` one without
    (:data:`CONTAINER_CAPABILITIES`), or with ``docker=False`` unavailable, as on a host
    without Docker. Each engine gets only the sandboxes whose spec names it."""
    engine_root = root / "engine"

    def engines(data: Path) -> Engines:
        qemu = AgentEngine(engine_root, name="qemu", lazy=True)
        other: Engine = Unavailable(NO_DOCKER, "docker")
        if docker:
            other = AgentEngine(
                engine_root, name="docker", lazy=True, capabilities=CONTAINER_CAPABILITIES
            )
        return Engines({"qemu": qemu, "docker": other}, "qemu")

    server = LiveServer(root, engine_factory=engines).start()
    try:
        _, token = server.store.create_user("tester")
        yield Daemon(server, token)
    finally:
        server.stop()
        kill_recorded_agents(engine_root)  # they outlive the engine's close, as VMs do


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("sdk-daemon")) as d:
        yield d


@pytest.fixture(scope="session")
def two_engine_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_two_engine_daemon(tmp_path_factory.mktemp("two-engines")) as d:
        yield d


@pytest.fixture(scope="session")
def no_docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_two_engine_daemon(tmp_path_factory.mktemp("no-docker"), docker=False) as d:
        yield d


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    """A real web service on a loopback port: a port "inside" every sandbox, since
    test-mode agents share the test's network (routes in tests/server/upstream.py)."""
    service = Upstream().start()
    yield service
    service.stop()


@pytest.fixture
def kiln(daemon: Daemon) -> Iterator[Kiln]:
    with Kiln(daemon.url, daemon.token) as k:
        yield k


@pytest.fixture
async def akiln(daemon: Daemon) -> AsyncIterator[AsyncKiln]:
    async with AsyncKiln(daemon.url, daemon.token) as k:
        yield k


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def sb(kiln: Kiln) -> Iterator[Sandbox]:
    sandbox = kiln.sandboxes.create(name=unique("sb"))
    yield sandbox
    with suppress(NotFound):
        kiln.sandboxes.delete(sandbox.id)
