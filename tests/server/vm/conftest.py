"""Fixtures of the API tests over real QEMU microVMs, in a network namespace.

One in-process server (``vm_server``) serves the modules that use it: it gets a
fresh ``ip netns add`` namespace for its sandbox network (bridge, TAPs, guest
IPs), removed in a finalizer, so no traffic leaves it; sharing it saves each
module a daemon start and a template boot. Each module gets it back as it was:
the sandboxes, volumes and secrets a module made are deleted at its end. Needs
root, QEMU and a buildable ``minimal`` image.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.engine.qemu import QemuConfig, QemuEngine
from kiln.engine.qemu.process import find_processes
from kiln.network import NetworkConfig

from ..harness import LiveServer

#: Marks every VM test module adds to its own ``pytestmark``.
vm_marks: list[pytest.MarkDecorator] = []


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (TAP devices, network namespaces)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    return None


if (_reason := _skip_reason()) is not None:
    vm_marks.append(pytest.mark.skip(reason=_reason))


@pytest.fixture(scope="package")
def netns() -> Iterator[str]:
    name = f"kiln-srv-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def network(netns: str) -> NetworkConfig:
    return NetworkConfig(netns=netns, bridge="kilnsrv0", subnet="10.213.42.0/24", nat=False)


@pytest.fixture(scope="package")
def shared_vm_server(tmp_path_factory: pytest.TempPathFactory, netns: str) -> Iterator[LiveServer]:
    net = network(netns)

    def factory(data: Path) -> QemuEngine:
        return QemuEngine(
            QemuConfig(data_dir=data / "qemu", volumes_dir=data / "volumes", network=net)
        )

    root = tmp_path_factory.mktemp("vm")
    server = LiveServer(root, engine_factory=factory, config_overrides={"network": net}).start()
    _, key = server.store.create_user("vm-tester")
    server.key = key  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        with httpx.Client(base_url=server.url, headers=_auth(key), timeout=120) as c:
            for sb in c.get("/sandboxes").json():
                c.delete(f"/sandboxes/{sb['id']}")
        server.stop()
        _kill_vms(root)


@pytest.fixture(scope="module")
def vm_server(shared_vm_server: LiveServer) -> Iterator[LiveServer]:
    """The shared server; what the module made through it is deleted at the module's end."""
    yield shared_vm_server
    key: str = shared_vm_server.key  # type: ignore[attr-defined]
    with httpx.Client(base_url=shared_vm_server.url, headers=_auth(key), timeout=120) as c:
        for sb in c.get("/sandboxes").json():
            assert c.delete(f"/sandboxes/{sb['id']}").status_code == 204
        for kind in ("volumes", "secrets"):
            for item in c.get(f"/{kind}").json():
                assert c.delete(f"/{kind}/{item['name']}").status_code == 204
    assert shared_vm_server.engine.list() == []


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def vm(vm_server: LiveServer) -> Iterator[httpx.Client]:
    key: str = vm_server.key  # type: ignore[attr-defined]
    with httpx.Client(base_url=vm_server.url, headers=_auth(key), timeout=300) as client:
        yield client


def _kill_vms(data: Path) -> None:
    """The VMs a daemon started outlive it by design: a failed test must not leave them."""
    for pid in find_processes(f"{data}/"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
