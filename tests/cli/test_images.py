"""``kiln image``: a package-list image built, listed, inspected and deleted through the
real ``kiln`` process and a real daemon (whose builds use the shared image cache).

The definition here reads its files from ``source:`` files but says exactly what
``tests/images/data/jq.yaml`` says, so its base tree is the one the suite built
before entering its network namespace: the build runs only the fast step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kiln.cli import EXIT_CODES

from .conftest import Cli, unique
from .test_commands import assert_one_line_error

pytestmark = pytest.mark.timeout(300)

DEFINITION = """\
packages: [jq]
files:
  - path: /etc/kiln-test/greeting
    source: greeting.txt
  - path: /usr/local/bin/kiln-hello
    source: hello.sh
    mode: "0755"
env: {KILN_TEST_IMAGE: jq}
"""


@pytest.fixture
def definition(tmp_path: Path) -> Path:
    (tmp_path / "greeting.txt").write_text("hello from a definition\n")
    (tmp_path / "hello.sh").write_text("#!/bin/sh\ncat /etc/kiln-test/greeting\n")
    path = tmp_path / "image.yaml"
    path.write_text(DEFINITION)
    return path


def test_build_list_inspect_delete(cli: Cli, definition: Path) -> None:
    name = unique("img")
    proc = cli("image", "build", name, "-f", str(definition))
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert proc.stdout.decode().startswith(f"image {name} ready (user, ")
    # Not a terminal: one progress line per message, with the elapsed time.
    assert "s] [base] cached: bookworm base rootfs" in stderr, stderr
    assert "s] [image] mkfs.ext4" in stderr, stderr

    listed = json.loads(cli.ok("image", "list", "--json"))
    assert listed[0]["name"] == "minimal"
    mine = next(i for i in listed if i["name"] == name)
    assert (mine["kind"], mine["scope"], mine["packages"]) == ("packages", "user", ["jq"])
    assert name in cli.ok("image", "ls")
    detail = cli.ok("image", "inspect", name)
    assert "/etc/kiln-test/greeting, /usr/local/bin/kiln-hello" in detail
    assert "env:" in detail and "KILN_TEST_IMAGE=jq" in detail
    assert json.loads(cli.ok("image", "inspect", name, "--json"))["ref"] == mine["ref"]

    # The same definition again is the same image.
    again = json.loads(cli.ok("image", "build", name, "-f", str(definition), "--json"))
    assert again["ref"] == mine["ref"]

    assert cli.ok("image", "rm", name) == f"image {name} deleted\n"
    gone = cli("image", "inspect", name)
    assert gone.returncode == EXIT_CODES["not found"]
    assert_one_line_error(gone, f"image {name!r} not found")


def test_bad_definitions_and_refusals(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("packages: [jq]\nfiles:\n  - path: etc/x\n    content: x\n")
    proc = cli("image", "build", "bad", "-f", str(bad))
    assert proc.returncode == EXIT_CODES["error"]
    assert_one_line_error(proc, "files[0].path", "absolute path")

    missing = tmp_path / "missing.yaml"
    missing.write_text("files:\n  - path: /etc/x\n    source: nope.txt\n")
    assert_one_line_error(cli("image", "build", "x", "-f", str(missing)), "files[0].source")

    others = cli("image", "rm", "theirs", "--owner", "someone-else")
    assert others.returncode == EXIT_CODES["unauthorized"]
    assert_one_line_error(others, "only an admin")

    builtin = cli("image", "rm", "minimal")
    assert builtin.returncode == EXIT_CODES["unauthorized"]
    assert_one_line_error(builtin, "built-in")


def test_a_dockerfile_is_sent_with_its_directory_and_checked(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm\nRUN true\n")
    other = cli("image", "build", "df", "-f", str(tmp_path / "Dockerfile"))
    assert other.returncode == EXIT_CODES["error"]
    assert_one_line_error(other, "only FROM minimal")

    # A good one reaches the daemon, whose engine here is not Docker: it says so.
    (tmp_path / "Dockerfile").write_text("FROM minimal\nCOPY hello.txt /hello.txt\n")
    (tmp_path / "hello.txt").write_text("hi\n")
    proc = cli("image", "build", "df", "-f", str(tmp_path / "Dockerfile"))
    assert proc.returncode != 0
    assert_one_line_error(proc, "needs the docker engine")

    big = tmp_path / "big"
    big.mkdir()
    (big / "Dockerfile").write_text("FROM minimal\n")
    (big / "blob").write_bytes(os.urandom(17 << 20))
    too_big = cli("image", "build", "df", "-f", str(big / "Dockerfile"))
    assert too_big.returncode != 0
    assert_one_line_error(too_big, "larger than 16 MiB")
