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

import pytest

from kiln.sdk import AsyncKiln, Kiln, NotFound, Sandbox
from server.harness import AgentEngine, LiveServer


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

    def workdir(self, sandbox_id: str) -> Path:
        """The sandbox's working directory (test-mode agents share the host filesystem)."""
        engine: AgentEngine = self.server.engine
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


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("sdk-daemon")) as d:
        yield d


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
