"""The README's E2B example, run as a user would: its Python block in a fresh
interpreter with only the three environment variables the README sets pointing the
unmodified ``e2b`` SDK at a real daemon with real VMs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import E2B_MARKS, E2bDaemon

pytestmark = E2B_MARKS

README = Path(__file__).resolve().parents[3] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Using the E2B SDK with kiln")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_sets_the_three_variables(e2b_daemon: E2bDaemon) -> None:
    (block,) = re.findall(r"^```sh\n(.*?)^```", _section(), re.S | re.M)
    exported = re.findall(r"^export (E2B_\w+)=", block, re.M)
    assert sorted(exported) == sorted(e2b_daemon.env())


def test_the_readme_s_e2b_example_runs(e2b_daemon: E2bDaemon, tmp_path: Path) -> None:
    (code,) = re.findall(r"^```python\n(.*?)^```", _section(), re.S | re.M)
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**env, **e2b_daemon.env()},
        capture_output=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, f"{out}\n{proc.stderr.decode()}"
    lines = out.splitlines()
    assert lines[0] == "running", lines
    assert lines[1].startswith("[SandboxInfo(") and "'job': 'ci'" in lines[1], lines
    assert lines[2:] == ["True", "True"], lines
    with e2b_daemon.api() as api:
        assert api.get("/sandboxes", params={"label": "job=ci"}).json() == []
