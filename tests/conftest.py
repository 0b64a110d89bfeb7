"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.testing.postgres import PostgresServer

SRC = Path(__file__).resolve().parent.parent / "src"


@dataclass
class AgentProcess:
    """A guest agent running as a real subprocess in test mode."""

    proc: subprocess.Popen[bytes]
    socket_dir: Path
    token: str | None

    @property
    def control(self) -> Path:
        return self.socket_dir / "control.sock"

    @property
    def forward(self) -> Path:
        return self.socket_dir / "forward.sock"


def start_agent(
    socket_dir: Path, token: str | None = None, extra: list[str] | None = None
) -> AgentProcess:
    """Start ``python -m kiln.guest --test-mode`` and wait until both sockets exist."""
    argv = [sys.executable, "-m", "kiln.guest", "--test-mode", "--socket-dir", str(socket_dir)]
    if token is not None:
        argv += ["--token", token]
    argv += extra or []
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + 10
    while not ((socket_dir / "control.sock").exists() and (socket_dir / "forward.sock").exists()):
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("agent did not create its sockets within 10 s")
        time.sleep(0.01)
    return AgentProcess(proc, socket_dir, token)


def stop_agent(agent: AgentProcess) -> None:
    agent.proc.terminate()
    try:
        agent.proc.wait(5)
    except subprocess.TimeoutExpired:
        agent.proc.kill()
        agent.proc.wait()


@pytest.fixture
def agent_token() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def agent(tmp_path: Path, agent_token: str) -> Iterator[AgentProcess]:
    """A fresh test-mode agent with a token, its sockets in a temp dir."""
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be long.
    sock_dir = Path(os.environ.get("KILN_TEST_SOCKDIR", "/tmp")) / f"ka-{secrets.token_hex(4)}"
    sock_dir.mkdir()
    proc = start_agent(sock_dir, agent_token)
    try:
        yield proc
    finally:
        stop_agent(proc)
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole run (initdb once), on 127.0.0.1."""
    with PostgresServer.start() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the run's server, dropped afterwards."""
    with postgres_server.database() as url:
        yield url
