"""The piped-stdin mechanics of ``kiln exec``, run for real with the local shell."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

from kiln.cli.execio import forward_stdin_wanted, spooled_stdin, stdin_command


def test_wrapper_feeds_the_file_removes_it_and_keeps_the_exit_code(tmp_path: Path) -> None:
    data = tmp_path / "stdin"
    data.write_bytes(b"line 1\n\x00\xffbinary\n")
    argv = stdin_command(str(data), ["sh", "-c", 'cat; echo "args:$#:$1" >&2; exit 3', "x", "a b"])
    proc = subprocess.run(argv, capture_output=True, check=False)
    assert proc.returncode == 3
    assert proc.stdout == b"line 1\n\x00\xffbinary\n"
    assert proc.stderr == b"args:1:a b\n"
    assert not data.exists()


def test_wrapper_reports_a_missing_command_as_127(tmp_path: Path) -> None:
    data = tmp_path / "stdin"
    data.write_bytes(b"")
    argv = stdin_command(str(data), ["no-such-cmd-kiln"])
    proc = subprocess.run(argv, capture_output=True, check=False)
    assert proc.returncode == 127


def test_forward_only_pipes_and_files_by_default(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        assert forward_stdin_wanted(None, read_end)
        assert not forward_stdin_wanted(False, read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    with open(os.devnull, "rb") as devnull:
        assert not forward_stdin_wanted(None, devnull.fileno())
        assert forward_stdin_wanted(True, devnull.fileno())
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with path.open("rb") as regular:
        assert forward_stdin_wanted(None, regular.fileno())
    assert not forward_stdin_wanted(None, 987)  # not an open descriptor


def test_spooled_stdin_is_rewound() -> None:
    with spooled_stdin(io.BytesIO(b"x" * 3_000_000)) as spool:
        assert spool.read() == b"x" * 3_000_000
