"""What the benches that drive the daemon's test harness share: their skip checks,
a millisecond timer, the harness's daemon on real microVMs, and a scratch network
namespace and data directory for benches that drive an engine directly."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def agent_skip_reason() -> str | None:
    """Why a test-mode agent and the server harness cannot run here, if they cannot."""
    if importlib.util.find_spec("kiln.guest.__main__") is None:
        return "kiln.guest has no __main__ (the agent is not built yet)"
    if not (ROOT / "tests" / "server" / "harness.py").exists():
        return "tests/server/harness.py is missing"
    return None


def vm_skip_reason() -> str | None:
    """Why real microVMs cannot run here, if they cannot."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("qemu-system-x86_64") is None or shutil.which("ip") is None:
        return "qemu-system-x86_64 or ip is missing"
    try:
        import kiln.engine.qemu  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"the QEMU engine does not import: {exc}"
    return None


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


@contextlib.contextmanager
def vm_live_server(bridge: str, subnet: str) -> Iterator[Any]:
    """The tests' in-process daemon (``tests/server/harness.py``) on the QEMU engine, in
    a network namespace of its own; VMs, namespace and files are gone afterwards."""
    from kiln.engine.qemu import QemuConfig, QemuEngine  # noqa: PLC0415
    from kiln.engine.qemu.process import find_processes  # noqa: PLC0415
    from kiln.images import ensure_image  # noqa: PLC0415
    from kiln.network import NetworkConfig  # noqa: PLC0415

    sys.path.insert(0, str(ROOT / "tests"))
    from server.harness import LiveServer  # noqa: PLC0415 - the test harness, on demand

    ensure_image("minimal", progress=lambda m: print(f"  image: {m}", flush=True))
    netns = f"kiln-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-vm-"))
    net = NetworkConfig(netns=netns, bridge=bridge, subnet=subnet, nat=False)

    def factory(data: Path) -> QemuEngine:
        return QemuEngine(
            QemuConfig(data_dir=data / "qemu", volumes_dir=data / "volumes", network=net)
        )

    server = LiveServer(root, engine_factory=factory, config_overrides={"network": net})
    try:
        server.start()
        yield server
    finally:
        if server.url:
            server.stop()
        for pid in find_processes(f"{root}/"):  # a VM outlives a server that failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def engine_scratch(name: str) -> Iterator[tuple[Path, str]]:
    """(a temporary data directory, a new network namespace) for an engine bench;
    its VMs, the namespace and the files are gone afterwards."""
    from kiln.engine.qemu.process import find_processes  # noqa: PLC0415

    netns = f"kb-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    data_dir = Path(tempfile.mkdtemp(prefix=f"kiln-bench-{name}-"))
    try:
        yield data_dir, netns
    finally:
        for pid in find_processes(f"{data_dir}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
