"""kiln.faults: what KILN_CRASH_AT arms, and that an armed step really kills."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from kiln import faults

SRC = Path(__file__).resolve().parents[1] / "src"


def test_arm_reads_steps_and_targets() -> None:
    try:
        armed = faults.arm({faults.ENV: " create.row_written, qemu.snapshot.writing:qemu ,"})
        assert armed == {"create.row_written": "self", "qemu.snapshot.writing": "qemu"}
        assert faults.arm({}) == {}
    finally:
        faults.arm({})


def test_unarmed_steps_do_nothing() -> None:
    faults.arm({faults.ENV: "other.step"})
    try:
        faults.crash_point("create.row_written")  # returns: not armed
        faults.crash_point("other.step:target")
    finally:
        faults.arm({})


def _run(code: str, crash_at: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env={"PYTHONPATH": str(SRC), faults.ENV: crash_at},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_armed_step_kills_the_process_there() -> None:
    code = (
        "from kiln import faults\n"
        "faults.arm()\n"
        "print('before', flush=True)\n"
        "faults.crash_point('create.row_written')\n"
        "print('after', flush=True)\n"
    )
    proc = _run(code, "create.row_written")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout == "before\n"
    assert "crash point create.row_written reached" in proc.stderr


def test_a_target_kills_the_named_process_and_carries_on() -> None:
    code = (
        "import subprocess\n"
        "from kiln import faults\n"
        "faults.arm()\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "faults.crash_point('step', qemu=child.pid)\n"
        "print(child.wait(), flush=True)\n"
    )
    proc = _run(code, "step:qemu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{-signal.SIGKILL}\n"
