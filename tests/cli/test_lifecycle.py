"""Labels, ttl and ``kiln run`` as a user runs them: the real ``kiln`` process, a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta

from kiln.sdk import Kiln

from .conftest import SRC, Cli, kiln_argv, unique


def _table_row(text: str, name: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.startswith(name + " "))


def test_create_with_labels_and_ttl_and_list_them(cli: Cli, kiln: Kiln) -> None:
    tag = unique("tag")
    name = unique("ttl")
    out = cli.ok("create", "--name", name, "--label", f"run={tag}", "-l", "role=web", "--ttl", "1h")
    assert f"labels:      role=web,run={tag}" in out
    assert "(in 59m, then destroy)" in out
    other = unique("plain")
    cli.ok("create", "--name", other, "--label", f"run={tag}", "--ttl", "90", "--on-expire", "stop")

    sb = kiln.sandboxes.get(name)
    assert sb.labels == {"run": tag, "role": "web"}
    assert sb.expires_at is not None
    assert timedelta(minutes=59) < sb.expires_at - datetime.now(UTC) <= timedelta(hours=1)
    assert kiln.sandboxes.get(other).on_expire == "stop"

    table = cli.ok("ls")
    assert table.splitlines()[0].split()[-1] == "EXPIRES"
    assert _table_row(table, name)[-2:] == ["in", "59m"]
    assert _table_row(table, other)[-2:] == ["in", "1m"]

    listed = json.loads(cli.ok("ls", "--json", "--label", f"run={tag}", "--label", "role=web"))
    assert [s["name"] for s in listed] == [name]
    assert listed[0]["labels"] == {"run": tag, "role": "web"}
    ids = {kiln.sandboxes.get(n).id for n in (name, other)}
    assert set(cli.ok("ls", "-q", "-l", f"run={tag}").split()) == ids
    assert cli.ok("ls", "-q", "-l", "run=nobody-has-this") == ""

    edited = json.loads(cli.ok("edit", name, "--ttl", "none", "--label", "only=this", "--json"))
    assert (edited["labels"], edited["expires_at"]) == ({"only": "this"}, None)
    assert _table_row(cli.ok("ls"), name)[-1] == "-"
    cli.ok("rm", name, other)


def test_bad_lifecycle_options_are_usage_errors(cli: Cli) -> None:
    for args, fragment in (
        (("create", "--ttl", "soon"), "invalid duration"),
        (("create", "--ttl", "-5m"), "invalid duration"),
        (("create", "--label", "novalue"), "KEY=VALUE"),
        (("create", "--on-expire", "explode"), "explode"),
        (("ls", "--label", "team"), "KEY=VALUE"),
        (("edit", "x"), "nothing to change"),
    ):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert fragment in proc.stderr.decode(), proc.stderr


def test_run_rm_streams_passes_the_exit_code_and_removes_the_sandbox(cli: Cli, kiln: Kiln) -> None:
    tag = unique("rm")
    proc = cli(
        "run", "--rm", "--label", f"t={tag}", "-e", "WHO=kiln", "--",
        "sh", "-c", "echo hi $WHO; echo oops >&2; exit 3",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == b"hi kiln\n"
    assert proc.stderr == b"oops\n"
    assert kiln.sandboxes.list(labels={"t": tag}) == []

    ok = cli("run", "--rm", "--label", f"t={tag}", "true")  # no "--" needed
    assert ok.returncode == 0 and kiln.sandboxes.list(labels={"t": tag}) == []
    missing = cli("run", "--rm", "--label", f"t={tag}", "--", "no-such-command-xyz")
    assert missing.returncode == 127
    assert kiln.sandboxes.list(labels={"t": tag}) == []


def test_run_without_rm_keeps_the_sandbox_and_names_it(cli: Cli, kiln: Kiln) -> None:
    name = unique("kept")
    proc = cli("run", "--name", name, "--", "sh", "-c", "echo kept > f; cat f")
    assert proc.returncode == 0
    assert proc.stdout == b"kept\n"
    assert proc.stderr.decode() == f"kiln: sandbox {name}\n"
    assert kiln.sandboxes.ref(name).exec(["cat", "f"]).stdout == "kept\n"
    kiln.sandboxes.delete(name)


def test_run_rm_removes_the_sandbox_on_ctrl_c(cli: Cli, kiln: Kiln) -> None:
    tag = unique("int")
    env = {**os.environ, "HOME": str(cli.home), **cli.env, "PYTHONPATH": str(SRC)}
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT dumps every thread's stack: see below
    command = ["sh", "-c", "echo ready; sleep 60"]
    proc = subprocess.Popen(
        # SIGINT as a terminal has it: a test run started in the background (`make
        # test &`, nohup) ignores it, and the CLI rightly keeps an ignored SIGINT ignored.
        [
            "env",
            "--default-signal=INT",
            *kiln_argv(),
            "run",
            "--rm",
            "-l",
            f"t={tag}",
            "--",
            *command,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert len(kiln.sandboxes.list(labels={"t": tag})) == 1
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=10)
            raise AssertionError(
                f"kiln run hung after Ctrl+C; where it was:\n{err.decode()}"
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 10
    assert kiln.sandboxes.list(labels={"t": tag}) == []


def test_fork_makes_a_copy_and_says_why_it_cannot(cli: Cli) -> None:
    name = unique("fork")
    cli.ok("create", "--name", name, "--label", "role=src")
    try:
        assert "fork:        yes\n" in cli.ok("inspect", name)
        copy = json.loads(cli.ok("fork", name, "--name", f"{name}-2", "--json"))
        assert (copy["name"], copy["labels"]) == (f"{name}-2", {"role": "src"})
        assert f"name:        {name}-3\n" in cli.ok("fork", name, "--name", f"{name}-3")
        taken = cli("fork", name, "--name", f"{name}-2")
        assert taken.returncode == 4 and "already exists" in taken.stderr.decode()
        assert cli("fork", unique("nobody")).returncode == 3
    finally:
        cli("rm", name, f"{name}-2", f"{name}-3")


def test_save_then_create_from_the_saved_image(cli: Cli) -> None:
    src, image, copy = unique("save"), unique("img"), unique("from")
    cli.ok("create", "--name", src, "--memory", "256")
    cli.ok("exec", src, "--", "sh", "-c", "echo kept > saved.txt")
    try:
        out = cli.ok("save", src, image)
        assert f"saved image {image} (" in out and f"kiln create --from-saved {image}" in out
        taken = cli("save", src, image)
        assert taken.returncode == 4 and "already exists" in taken.stderr.decode()
        assert cli("save", unique("nobody"), unique("img")).returncode == 3
        listed = json.loads(cli.ok("saved", "list", "--json"))
        assert [(i["name"], i["memory_mb"]) for i in listed] == [(image, 256)]
        assert _table_row(cli.ok("saved", "list"), image)[4] == "256M"
        made = json.loads(cli.ok("create", "--from-saved", image, "--name", copy, "--json"))
        assert made["memory_mb"] == 256
        assert cli.ok("exec", copy, "--", "cat", "saved.txt") == "kept\n"
        wrong = cli("create", "--from-saved", image, "--env", "A=b")
        assert wrong.returncode != 0 and "saved image" in wrong.stderr.decode()
        assert cli.ok("saved", "delete", image) == f"saved image {image} deleted\n"
        gone = cli("create", "--from-saved", image)
        assert gone.returncode == 3 and "not found" in gone.stderr.decode()
    finally:
        cli("rm", src, copy)
        cli("saved", "delete", image)
