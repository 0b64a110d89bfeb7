"""Fixtures of the E2B-compatible API tests: the unmodified ``e2b`` SDK against a real
``kiln serve`` with real QEMU microVMs.

One daemon serves every E2B test of the session (:func:`e2b_daemon`): the real
CLI in a subprocess, its sandbox network in a network namespace of its own
(``tests/server/vm/host.py``), two users with API keys. Tests configure the SDK
as users do, with the three environment variables (:func:`e2b_env`, user 1),
and reach the sandboxes through kiln's own API too (:func:`kiln_api`).

A VM create costs ~1.5 s under TCG: share sandboxes across the tests of a module
where nothing one test does can leak into another (module-scoped fixtures built
with :func:`make_sandbox`), and kill what a test creates for itself.

Fixtures (for the E2B test modules of every helper):

- ``e2b_daemon`` (session): :class:`E2bDaemon`: ``url``, ``key`` (user 1),
  ``other_key`` (user 2), ``env(key)`` (the SDK's three variables), ``api(key)``
  (an httpx client of kiln's own API), ``host`` (its ``Host``: data dir, log).
- ``e2b_env`` (function): sets ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and
  ``E2B_API_KEY`` (user 1) with monkeypatch; returns the daemon.
- ``kiln_api`` (function): an httpx client of kiln's API as user 1.

A test module marks itself ``pytestmark = E2B_MARKS`` (vm, netns, and a skip
where VMs cannot run).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from ..vm.conftest import vm_marks
from ..vm.host import Bridge, Host, daemon_host
from ..vm.serve import SRC, Serve

#: The marks of every module that runs the SDK against the daemon.
E2B_MARKS = [pytest.mark.vm, pytest.mark.netns, *vm_marks, pytest.mark.timeout(600)]

#: Where the E2B API lives under the daemon's URL.
E2B_PATH = "/e2b"
ENVD_PATH = "/e2b/envd"


@dataclass
class E2bDaemon:
    host: Host
    serve: Serve
    #: User 1 (the one the SDK is configured for) and user 2.
    key: str
    other_key: str

    @property
    def url(self) -> str:
        return self.serve.url

    def env(self, key: str | None = None) -> dict[str, str]:
        """The SDK's configuration, as a user sets it."""
        return {
            "E2B_API_URL": self.url + E2B_PATH,
            "E2B_SANDBOX_URL": self.url + ENVD_PATH,
            "E2B_API_KEY": key or self.key,
        }

    def api(self, key: str | None = None) -> httpx.Client:
        """kiln's own API as ``key``'s user (default user 1)."""
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


def new_user(host: Host, name: str) -> str:
    """A new kiln user (through the CLI, as an admin would); its API key."""
    env = dict(os.environ, HOME=str(host.home), PYTHONPATH=str(SRC))
    out = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "user", "create", name, "--config", str(host.config)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    keys = re.findall(r"^(\S{20,})$", out, re.MULTILINE)
    assert keys, out
    return str(keys[0])


@pytest.fixture(scope="session")
def e2b_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2bDaemon]:
    with daemon_host(
        tmp_path_factory.mktemp("e2b"), "kiln-e2b", vm=Bridge("ke2b0", "10.213.47.0/24")
    ) as host:
        serve = host.serve()
        try:
            daemon = E2bDaemon(host, serve, new_user(host, "alice"), new_user(host, "bob"))
            yield daemon
            for key in (daemon.key, daemon.other_key):
                with daemon.api(key) as c:
                    for sb in c.get("/sandboxes").json():
                        c.delete(f"/sandboxes/{sb['id']}")
        finally:
            serve.stop()


@pytest.fixture(scope="session")
def e2b_docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2bDaemon]:
    """A second daemon whose default engine is Docker (its own dockerd), for the E2B
    behaviour that differs in a container."""
    with daemon_host(
        tmp_path_factory.mktemp("e2b-docker"),
        "kiln-e2bd",
        vm=Bridge("ke2bq0", "10.213.48.0/24"),
        docker=Bridge("ke2bd0", "10.213.49.0/24"),
        extra={"engine": "docker", "templates": False},
    ) as host:
        serve = host.serve()
        try:
            yield E2bDaemon(host, serve, new_user(host, "carol"), new_user(host, "dave"))
        finally:
            serve.stop()


@pytest.fixture
def e2b_env(e2b_daemon: E2bDaemon, monkeypatch: pytest.MonkeyPatch) -> E2bDaemon:
    for name, value in e2b_daemon.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return e2b_daemon


@pytest.fixture
def kiln_api(e2b_daemon: E2bDaemon) -> Iterator[httpx.Client]:
    with e2b_daemon.api() as client:
        yield client


@contextlib.contextmanager
def sdk_env(daemon: E2bDaemon, key: str | None = None) -> Iterator[None]:
    """The SDK's variables for a module-scoped fixture (monkeypatch is per test)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in daemon.env(key).items():
            mp.setenv(name, value)
        yield


def make_sandbox(daemon: E2bDaemon, **create: Any) -> Any:
    """``e2b.Sandbox.create(**create)`` for user 1, outside a test's monkeypatch; the
    sandbox keeps its connection config (env variables are read at create)."""
    from e2b import Sandbox  # noqa: PLC0415

    with sdk_env(daemon):
        return Sandbox.create(**create)


def kiln_exec(api: httpx.Client, sandbox_id: str, script: str, user: str | None = None) -> str:
    """stdout of ``sh -c script`` in the sandbox through kiln's API (must exit 0)."""
    body: dict[str, Any] = {"cmd": ["sh", "-c", script], "timeout_s": 120}
    if user is not None:
        body["user"] = user
    r = api.post(f"/sandboxes/{sandbox_id}/exec", json=body)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


__all__ = ["E2B_MARKS", "E2bDaemon", "kiln_exec", "make_sandbox", "new_user", "sdk_env"]
