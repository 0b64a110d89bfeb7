"""The host one real ``kiln serve`` runs on: a network namespace of its own, its
directories and its ``kiln.yaml``, and everything it leaves torn down afterwards.

The daemon's sandbox networks (the VMs' bridge, the containers' own: their
TAPs, veths, addresses and firewall rules) and its private dockerd live in the
namespace, so none of it touches the machine's network or another module's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from kiln.engine.docker import Dockerd, DockerdConfig
from kiln.engine.docker.testing import unavailable_reason
from kiln.engine.qemu.process import find_processes
from kiln.images.cache import default_image_dir

from .serve import Serve


class Bridge(NamedTuple):
    name: str
    subnet: str


@dataclass(frozen=True)
class Host:
    """``root`` holds ``kiln.yaml``, ``home`` (the daemon's ``HOME``), ``serve.log`` and
    ``d`` (the private dockerd's root); ``data`` is the daemon's data directory."""

    root: Path
    netns: str
    vm: Bridge
    docker: Bridge | None
    data: Path

    @property
    def config(self) -> Path:
        return self.root / "kiln.yaml"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def log(self) -> Path:
        return self.root / "serve.log"

    @property
    def docker_root(self) -> Path:
        return self.root / "d"

    @property
    def dockerd(self) -> DockerdConfig:
        """The private dockerd the daemon starts in the namespace."""
        return DockerdConfig(root=self.docker_root, netns=self.netns)

    def serve(self, env: Mapping[str, str | None] | None = None) -> Serve:
        """A daemon on this host, appending to its one log (restarts included)."""
        return Serve(self.config, self.home, self.log, env=env)


@contextlib.contextmanager
def namespace(prefix: str) -> Iterator[str]:
    """A fresh named network namespace (``PREFIX-<random>``) with lo up, deleted on exit."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def kill_vms(directory: Path) -> list[int]:
    """SIGKILL the QEMU processes whose command line names something under ``directory``
    (the VMs a daemon started outlive it by design); their pids."""
    pids = find_processes(f"{directory}/")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@contextlib.contextmanager
def daemon_host(
    root: Path,
    prefix: str,
    *,
    vm: Bridge,
    docker: Bridge | None = None,
    nat: bool = False,
    dns: Sequence[str] = (),
    data: Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Iterator[Host]:
    """A :class:`Host` under ``root`` in a namespace named after ``prefix``.

    ``vm``: the VMs' bridge; ``docker``: the containers' (None: no Docker sandboxes,
    and with one the test is skipped where no private dockerd can run); ``nat`` and
    ``dns``: the sandbox network's (no ``dns``: the daemon's default); ``data``: the
    data directory (default ``root/data``); ``extra``: more top-level config keys.
    On exit, however the body ended, the dockerd (and its containers) is stopped,
    the VMs are killed and the namespace is deleted; the daemon is the caller's.
    """
    if docker is not None and (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    with namespace(prefix) as name:
        host = Host(
            root=root,
            netns=name,
            vm=vm,
            docker=docker,
            data=root / "data" if data is None else data,
        )
        try:
            host.home.mkdir()
            host.config.write_text(yaml.safe_dump(_config(host, nat, dns, extra or {})))
            yield host
        finally:
            if docker is not None:
                with contextlib.suppress(Exception):
                    Dockerd(host.dockerd).stop()
            kill_vms(host.data)


def _config(host: Host, nat: bool, dns: Sequence[str], extra: Mapping[str, Any]) -> dict[str, Any]:
    network: dict[str, Any] = {
        "netns": host.netns,
        "bridge": host.vm.name,
        "subnet": host.vm.subnet,
        "nat": nat,
    }
    if dns:
        network["dns"] = list(dns)
    config: dict[str, Any] = {
        "data_dir": str(host.data),
        "listen": "127.0.0.1:0",
        # The images built before the tests (HOME is a fresh one here).
        "image_dir": str(default_image_dir()),
        "network": network,
        # No warm pool (extra VMs per daemon on a 2-core box) but in the pool's tests.
        "pool": {"size": 0},
    }
    if host.docker is not None:
        config["docker"] = {
            "bridge": host.docker.name,
            "subnet": host.docker.subnet,
            "root": str(host.docker_root),
        }
    return {**config, **extra}
