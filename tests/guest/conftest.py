"""Agents for the guest tests: one shared test-mode agent, and a factory for special ones."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import AgentProcess, start_agent, stop_agent


def short_dir(prefix: str) -> Path:
    """A fresh directory with a short path (Unix socket paths are limited to 108 bytes)."""
    base = Path(os.environ.get("KILN_TEST_SOCKDIR", "/tmp"))
    path = base / f"{prefix}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


@dataclass
class Guest:
    """A running test-mode agent and its default working directory."""

    proc: AgentProcess
    workdir: Path

    @property
    def control(self) -> Path:
        return self.proc.control

    @property
    def forward(self) -> Path:
        return self.proc.forward

    @property
    def token(self) -> str | None:
        return self.proc.token

    @property
    def pid(self) -> int:
        return self.proc.proc.pid


def start_guest(
    token: str | None, extra: list[str] | None = None, config: dict[str, Any] | None = None
) -> Guest:
    sock_dir = short_dir("kg")
    workdir = sock_dir / "work"
    workdir.mkdir()
    args = ["--workdir", str(workdir), *(extra or [])]
    if config is not None:
        path = sock_dir / "config.json"
        path.write_text(json.dumps(config))
        args += ["--config", str(path)]
    return Guest(start_agent(sock_dir, token, args), workdir)


def stop_guest(guest: Guest) -> None:
    stop_agent(guest.proc)
    assert guest.proc.proc.returncode == 0, f"agent exited with {guest.proc.proc.returncode}"
    shutil.rmtree(guest.proc.socket_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    """One agent (with a token) shared by the tests that do not need special settings."""
    agent = start_guest(secrets.token_hex(16))
    try:
        yield agent
    finally:
        stop_guest(agent)


@pytest.fixture
def workdir(guest: Guest, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A clean directory of the shared agent's workdir, for one test."""
    path = guest.workdir / request.node.name.replace("/", "_")[:60]
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_agent() -> Iterator[Callable[..., Guest]]:
    """Start dedicated agents: ``make_agent(token=..., extra=[...], config={...})``."""
    started: list[Guest] = []

    def make(
        *,
        token: str | None = "secret-token",
        extra: list[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Guest:
        agent = start_guest(token, extra, config)
        started.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in started:
            stop_guest(agent)
