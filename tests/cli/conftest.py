"""The real ``kiln`` executable run as a subprocess against a real daemon (tests/sdk/conftest.py).

Every run gets its own ``HOME`` (no ``~/.kiln/config.yaml`` unless a test writes
one) and ``KILN_URL``/``KILN_TOKEN`` pointing at the test daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdk.conftest import (
    NO_DOCKER,
    Daemon,
    kiln,
    no_docker_daemon,
    running_daemon,
    sb,
    two_engine_daemon,
    unique,
    upstream,
)

__all__ = [
    "NO_DOCKER",
    "Cli",
    "Daemon",
    "cli",
    "daemon",
    "kiln",
    "kiln_argv",
    "no_docker_daemon",
    "sb",
    "two_engine_daemon",
    "unique",
    "upstream",
]

KILN = Path(sys.executable).with_name("kiln")
SRC = Path(__file__).resolve().parents[2] / "src"


def kiln_argv() -> list[str]:
    """The installed console script when there is one, else ``python -m kiln.cli``."""
    return [str(KILN)] if KILN.exists() else [sys.executable, "-m", "kiln.cli"]


@dataclass
class Cli:
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def __call__(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``kiln ARGS``; stdin is ``input`` (a pipe) or /dev/null."""
        full_env = {**os.environ, "HOME": str(self.home), **self.env, **(env or {})}
        full_env.pop("KILN_DEBUG", None)
        full_env["PYTHONPATH"] = str(SRC)
        return subprocess.run(
            [*kiln_argv(), *args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            env=full_env,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, input: bytes | None = None) -> str:
        """Run and insist on exit status 0; stdout as text."""
        proc = self(*args, input=input)
        assert proc.returncode == 0, (args, proc.returncode, proc.stderr.decode())
        return proc.stdout.decode()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("cli-daemon")) as d:
        yield d


@pytest.fixture
def cli(daemon: Daemon, tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home, {"KILN_URL": daemon.url, "KILN_TOKEN": daemon.token})
