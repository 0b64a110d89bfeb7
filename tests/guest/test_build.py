"""The zipapp: deterministic, self-contained, and a working agent."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AgentProcess, stop_agent
from kiln.guest.build import build_zipapp

from ._wire import run
from .conftest import Guest, short_dir


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zipapp(tmp_path_factory.mktemp("pyz") / "agent.pyz")


def test_contents(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
    assert names == sorted(names)
    assert "__main__.py" in names
    assert "kiln/guest/agent.py" in names and "kiln/guest/agent.pyc" in names
    assert "kiln/protocol/frames.py" in names
    assert not [n for n in names if "__pycache__" in n]
    # Only the stdlib-only packages: nothing of the host side.
    assert {n.split("/")[1] for n in names if n.count("/") >= 2} == {"guest", "protocol"}
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")


def test_deterministic(pyz: Path, tmp_path: Path) -> None:
    again = build_zipapp(tmp_path / "again.pyz")
    assert again.read_bytes() == pyz.read_bytes()


@pytest.fixture
def pyz_agent(pyz: Path) -> Iterator[Guest]:
    sock_dir = short_dir("kz")
    # -S -I: no site-packages, no PYTHONPATH, no cwd: only the stdlib and the archive.
    argv = [sys.executable, "-S", "-I", str(pyz), "--test-mode", "--socket-dir", str(sock_dir)]
    proc = subprocess.Popen([*argv, "--token", "zip-token"], cwd="/")
    deadline = time.monotonic() + 10
    while not (sock_dir / "forward.sock").exists():
        assert proc.poll() is None, f"zipapp agent exited with {proc.returncode}"
        assert time.monotonic() < deadline, "zipapp agent did not start"
        time.sleep(0.01)
    agent = AgentProcess(proc, sock_dir, "zip-token")
    try:
        yield Guest(agent, Path("/"))
    finally:
        stop_agent(agent)
        for path in sock_dir.iterdir():
            path.unlink()
        sock_dir.rmdir()


async def test_zipapp_runs_an_exec(pyz_agent: Guest) -> None:
    result = await run(pyz_agent, ["sh", "-c", "echo from-zipapp; pwd"])
    assert result.stdout == b"from-zipapp\n/\n"
    assert result.code == 0
