"""Choosing an engine from the command line: the real ``kiln`` process, a real daemon.

``--engine``/``--runtime`` must reach the daemon (it echoes them, or refuses a
bad pair); ``kiln ls``/``inspect``/``stop``/``health`` show what it says back.
The daemon runs the real engine router over two agent-backed fake engines,
``qemu`` and ``docker`` (without snapshots), or with ``docker`` unavailable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.sdk import Kiln

from .conftest import NO_DOCKER, Cli, Daemon, unique


@pytest.fixture
def cli(two_engine_daemon: Daemon, tmp_path: Path) -> Cli:
    return Cli(tmp_path, {"KILN_URL": two_engine_daemon.url, "KILN_TOKEN": two_engine_daemon.token})


@pytest.fixture
def kiln(two_engine_daemon: Daemon) -> Iterator[Kiln]:
    with Kiln(two_engine_daemon.url, two_engine_daemon.token) as client:
        yield client


def _engine_cell(table: str, name: str) -> str:
    lines = table.splitlines()
    row = next(line.split() for line in lines if line.startswith(name + " "))
    return row[lines[0].split().index("ENGINE")]


def test_create_with_engine_and_runtime_and_list_them(cli: Cli, kiln: Kiln) -> None:
    gvisor, runc, default = unique("gv"), unique("rc"), unique("df")
    out = cli.ok("create", "--name", gvisor, "--engine", "docker", "--runtime", "runsc")
    assert "engine:      docker\nruntime:     runsc\npause:       yes\n" in out
    assert "snapshots:   no (never cold; a stop keeps its files but ends its processes)" in out
    cli.ok("create", "--name", runc, "--runtime", "runc")  # a runtime alone means docker
    out = cli.ok("create", "--name", default)
    assert "engine:      qemu\nruntime:     -\n" in out
    assert "snapshots:   yes (cold and stopped keep its memory and processes)" in out
    try:
        table = cli.ok("ls")
        assert _engine_cell(table, gvisor) == "docker/runsc"
        assert _engine_cell(table, runc) == "docker/runc"
        assert _engine_cell(table, default) == "qemu"
        listed = {s["name"]: s for s in json.loads(cli.ok("ls", "--json"))}
        assert (listed[gvisor]["engine"], listed[gvisor]["runtime"]) == ("docker", "runsc")
        assert listed[gvisor]["capabilities"] == {"pause": True, "snapshots": False, "fork": False}
        sb = kiln.sandboxes.get(runc)
        assert (sb.engine, sb.runtime) == ("docker", "runc")
    finally:
        cli.ok("rm", gvisor, runc, default)


def test_a_bad_pair_is_refused_by_the_daemon(cli: Cli) -> None:
    proc = cli("create", "--engine", "qemu", "--runtime", "runsc")
    assert proc.returncode == 1
    assert proc.stderr.decode() == (
        "kiln: error: runtime: only the docker engine has runtimes"
        " (this sandbox's engine is qemu)\n"
    )
    for args in (("create", "--engine", "xen"), ("run", "--runtime", "kata", "--", "true")):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Invalid value for '--" in proc.stderr.decode()


def test_run_creates_on_the_engine_asked_for(cli: Cli, kiln: Kiln) -> None:
    name = unique("run")
    proc = cli("run", "--name", name, "--runtime", "runsc", "--", "echo", "ok")
    assert (proc.returncode, proc.stdout) == (0, b"ok\n"), proc.stderr
    try:
        sb = kiln.sandboxes.get(name)
        assert (sb.engine, sb.runtime) == ("docker", "runsc")
    finally:
        kiln.sandboxes.delete(name)


def test_stop_says_what_a_stop_without_snapshots_did(cli: Cli) -> None:
    container, vm = unique("ct"), unique("vm")
    cli.ok("create", "--name", container, "--engine", "docker")
    cli.ok("create", "--name", vm, "--engine", "qemu")
    try:
        pid = cli.ok("exec", "-d", container, "--", "sleep", "600").strip()
        assert cli.ok("stop", container) == (
            f"{container}: stopped; its files are kept but its processes were ended"
            f" (its engine has no snapshots); kiln start {container} boots it again\n"
        )
        assert cli.ok("start", container) == f"{container}: running\n"
        assert pid not in cli.ok("ps", container).split()
        assert cli.ok("stop", vm) == f"{vm}: stopped\n"  # a snapshot keeps everything
        assert cli.ok("start", vm) == f"{vm}: running\n"
    finally:
        cli.ok("rm", container, vm)


def test_health_shows_each_engine(no_docker_daemon: Daemon, tmp_path: Path) -> None:
    cli = Cli(tmp_path, {"KILN_URL": no_docker_daemon.url})  # /health needs no key
    lines = cli.ok("health").splitlines()
    assert "engine:    qemu (default for new sandboxes)" in lines
    assert "qemu:      ok" in lines
    assert f"docker:    unavailable: {NO_DOCKER}" in lines
    assert json.loads(cli.ok("health", "--json"))["engines"] == {"qemu": "ok", "docker": NO_DOCKER}


def test_create_on_an_unavailable_engine_says_why(no_docker_daemon: Daemon, tmp_path: Path) -> None:
    cli = Cli(tmp_path, {"KILN_URL": no_docker_daemon.url, "KILN_TOKEN": no_docker_daemon.token})
    proc = cli("create", "--engine", "docker")
    assert proc.returncode == 1
    assert proc.stderr.decode() == f"kiln: error: engine unavailable: {NO_DOCKER}\n"
