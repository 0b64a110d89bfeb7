"""What the benches that drive the daemon's test harness share: their skip checks
and a millisecond timer."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

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
