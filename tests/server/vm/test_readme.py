"""The README's examples, run as a user would: its CLI blocks and its Python SDK block,
against a real daemon with real VMs, so the documentation cannot drift from the code.

Every ``sh`` block made only of ``.venv/bin/kiln`` commands runs as one bash
script (``set -e``: every command must succeed). A line is left out only for a
reason listed in :data:`SKIP_LINES`; blocks of other commands (``make``, ``curl``)
or needing an engine this daemon lacks are listed in :data:`SKIP_BLOCKS`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..harness import LiveServer

# A README block runs several VM operations in a row (~40 s quiet, minutes when busy).
pytestmark = [pytest.mark.vm, pytest.mark.netns, pytest.mark.timeout(600)]

README = Path(__file__).resolve().parents[3] / "README.md"
KILN = Path(sys.executable).with_name("kiln")
SRC = README.parent / "src"

#: Lines of CLI blocks not run here, by a fragment of the line, and why.
SKIP_LINES = {
    "apt-get update": "needs the internet, which the test namespace does not have",
    "kiln shell dev": "needs a terminal (tests/cli/test_shell.py drives it in a pty)",
    "logs dev $PID -f": "follows the server until it exits, which the next line causes",
    "-- make test": "a sandbox made for the example has no Makefile",
}
#: CLI blocks not run here, by a fragment of their first line, and why.
SKIP_BLOCKS = {
    "--engine docker": "needs the Docker engine (tests/cli/test_engines.py runs these)",
}


def code_blocks(lang: str) -> Iterator[tuple[int, str]]:
    """``(line number, body)`` of every fenced block of ``lang`` in the README."""
    text = README.read_text()
    for match in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M):
        yield text[: match.start()].count("\n") + 1, match.group(1)


def cli_blocks() -> list[tuple[int, str]]:
    blocks = []
    for line_no, body in code_blocks("sh"):
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
        if lines and all(".venv/bin/kiln" in ln for ln in lines):
            blocks.append((line_no, body))
    return blocks


def runnable(body: str) -> str:
    kept = [ln for ln in body.splitlines() if not any(f in ln for f in SKIP_LINES)]
    return "set -euo pipefail\n" + "\n".join(kept).replace(".venv/bin/kiln", str(KILN)) + "\n"


@pytest.fixture
def user_env(vm_server: LiveServer, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    key: str = vm_server.key  # type: ignore[attr-defined]
    return {
        **os.environ,
        "HOME": str(home),
        "KILN_URL": vm_server.url,
        "KILN_TOKEN": key,
        "PYTHONPATH": str(SRC),
    }


def test_the_readme_has_the_blocks_this_test_expects() -> None:
    blocks = cli_blocks()
    assert len(blocks) >= 4, blocks
    for fragment in SKIP_LINES:
        assert any(fragment in body for _, body in blocks), f"stale skip: {fragment}"
    assert len([b for b in code_blocks("python")]) >= 1


@pytest.mark.parametrize(
    ("line_no", "body"), cli_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_cli_block(line_no: int, body: str, user_env: dict[str, str], tmp_path: Path) -> None:
    first = body.splitlines()[0]
    reason = next((why for frag, why in SKIP_BLOCKS.items() if frag in first), None)
    if reason:
        pytest.skip(f"README line {line_no}: {reason}")
    (tmp_path / "app.py").write_text("print('hello')\n")  # `kiln file write ... ./app.py`
    proc = subprocess.run(
        ["bash", "-c", runnable(body)],
        cwd=tmp_path,
        env=user_env,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, (
        f"README line {line_no}:\n{proc.stdout.decode()}\n{proc.stderr.decode()}"
    )
    out = proc.stdout.decode()
    if "print(6 * 7)" in body:
        assert "42\n" in out
    if "port publish" in body:
        assert re.search(r"http://\w+-\d+\.localhost:\d+/", out), out
    # Leave nothing behind for the next block (the README's blocks reuse names).
    for name in re.findall(r"create --name (\S+)", body):
        subprocess.run([str(KILN), "rm", name], env=user_env, capture_output=True, check=False)


def test_python_sdk_block(user_env: dict[str, str], tmp_path: Path) -> None:
    (line_no, code), *_ = [
        (n, body) for n, body in code_blocks("python") if "from kiln.sdk import Kiln" in body
    ]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=user_env,
        capture_output=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, f"README line {line_no}:\n{out}\n{proc.stderr.decode()}"
    lines = out.splitlines()
    assert lines[0] == "0 42", lines[:3]  # print(exit_code, stdout): stdout ends in "\n"
    assert "0" in lines[1:4]  # id -u as root
    assert {"1", "2", "3"} <= set(lines)  # the streamed loop
    assert "print('hello')" in lines and "'app.py'" in out
    assert "143" in lines  # the server's exit status after TERM
    assert "hi" in out  # the shell session
    assert "sandbox 'nope' not found" in out
    assert "{'job': 'ci'}" in out
