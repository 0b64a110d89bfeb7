"""Fixtures for tests against a real, private dockerd (``kiln.engine.docker.testing``).

One dockerd serves the whole session: it starts in a network namespace of its
own (``kd-<random>``) with kiln's bridge in it, and is stopped in the
finalizer, containers, mounts, cgroups and namespace included, whether the
tests passed or not. Without root or without Debian's docker.io the tests are
skipped with the reason; a dockerd that is installed but does not start is an
error, not a skip.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.docker import Dockerd
from kiln.engine.docker.testing import (
    busybox_rootfs_tar,
    import_rootfs,
    private_dockerd,
    unavailable_reason,
)

IMAGE = "kiln-test/busybox:latest"
RUNTIMES = ("runc", "runsc")


def skip_unless_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    skip_unless_available()
    with private_dockerd(tmp_path_factory.mktemp("dockerd")) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def docker_client(dockerd: Dockerd) -> Iterator[Any]:
    with contextlib.closing(dockerd.client()) as client:
        yield client


@pytest.fixture(scope="session")
def busybox(docker_client: Any) -> str:
    """The tag of a busybox image imported from a tarball made here (no registry)."""
    return import_rootfs(docker_client, busybox_rootfs_tar(), IMAGE)


@pytest.fixture
def run_container(docker_client: Any, busybox: str) -> Iterator[Callable[..., Any]]:
    """``run_container(cmd, runtime=..., **kwargs)``: a detached container, force-removed after."""
    made: list[Any] = []

    def run(cmd: list[str], **kwargs: Any) -> Any:
        container = docker_client.containers.run(busybox, cmd, detach=True, **kwargs)
        made.append(container)
        return container

    try:
        yield run
    finally:
        for container in made:
            with contextlib.suppress(Exception):
                container.remove(force=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace for a dockerd started by the test itself."""
    skip_unless_available()
    name = f"kd-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.fixture
def dockerd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh root for a test that starts a dockerd of its own."""
    return tmp_path_factory.mktemp("dockerd")
