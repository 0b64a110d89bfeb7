"""The client under test, pointed at a real test-mode agent subprocess.

``client`` gets a fresh agent per test (the ``agent`` fixture of
tests/conftest.py). Modules whose tests do not depend on the agent's state
(exec, files) use ``shared_client`` instead: one agent per module, which
keeps the suite fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kiln.agent_client import AgentClient

from .helpers import running_agent

if TYPE_CHECKING:
    from tests.conftest import AgentProcess


@pytest.fixture
def client(agent: AgentProcess) -> AgentClient:
    return AgentClient.unix_dir(agent.socket_dir, agent.token, connect_timeout=2, auth_timeout=5)


@pytest.fixture(scope="module")
def module_agent() -> Iterator[tuple[Path, str]]:
    with running_agent() as where:
        yield where


@pytest.fixture
def shared_client(module_agent: tuple[Path, str]) -> AgentClient:
    sock_dir, token = module_agent
    return AgentClient.unix_dir(sock_dir, token, connect_timeout=2, auth_timeout=5)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory for cwd and files (the test-mode agent shares this host's filesystem)."""
    path = tmp_path / "work"
    path.mkdir()
    return path
