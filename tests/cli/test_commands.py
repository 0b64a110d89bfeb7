"""The ``kiln`` CLI as a user runs it: a subprocess talking real HTTP to a real daemon."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from kiln.cli import EXIT_CODES
from kiln.sdk import Kiln, Sandbox
from sdk.conftest import Daemon

from .conftest import SRC, Cli, kiln_argv, unique


def assert_one_line_error(proc: object, *fragments: str) -> None:
    stderr = proc.stderr.decode()  # type: ignore[attr-defined]
    assert proc.returncode != 0, stderr  # type: ignore[attr-defined]
    assert stderr.startswith("kiln: error: "), stderr
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_version(cli: Cli) -> None:
    assert cli.ok("version").startswith("kiln ")


def test_create_list_exec_destroy_by_name(cli: Cli, kiln: Kiln) -> None:
    name = unique("life")
    created = cli.ok("create", "--name", name, "--cpus", "2", "--memory", "256", "-e", "A=1")
    assert f"name:        {name}" in created
    sandbox_id = kiln.sandboxes.get(name).id
    assert sandbox_id in created

    assert name in cli.ok("list")
    listed = json.loads(cli.ok("ls", "--json"))
    mine = next(s for s in listed if s["name"] == name)
    assert (mine["id"], mine["cpus"], mine["memory_mb"]) == (sandbox_id, 2, 256)
    assert json.loads(cli.ok("inspect", name, "--json"))["id"] == sandbox_id
    assert sandbox_id in cli.ok("list", "-q").split()

    assert cli.ok("exec", name, "--", "sh", "-c", "echo $A") == "1\n"
    assert cli.ok("exec", sandbox_id, "--", "echo", "by-id") == "by-id\n"

    assert cli.ok("rm", name) == f"destroyed {name}\n"
    assert name not in cli.ok("list")


def test_exec_forwards_the_exit_code(cli: Cli, sb: Sandbox) -> None:
    assert cli("exec", sb.name, "--", "sh", "-c", "exit 7").returncode == 7
    assert cli("exec", sb.name, "--", "true").returncode == 0
    assert cli("exec", sb.name, "--", "no-such-command-xyz").returncode == 127


def test_exec_keeps_stdout_and_stderr_apart_byte_for_byte(cli: Cli, sb: Sandbox) -> None:
    script = "printf 'out\\377\\000'; printf 'err\\001' >&2; printf more"
    proc = cli("exec", sb.name, "--", "sh", "-c", script)
    assert proc.returncode == 0
    assert proc.stdout == b"out\xff\x00more"
    assert proc.stderr == b"err\x01"


def test_exec_options_pass_through(cli: Cli, sb: Sandbox, daemon: Daemon) -> None:
    out = cli.ok("exec", "-e", "X=y", "--cwd", "/", sb.name, "--", "sh", "-c", "echo $X; pwd")
    assert out == "y\n/\n"
    # Once the command has started, options belong to it, "--" included.
    assert cli.ok("exec", sb.name, "printf", "%s|", "-e", "--cwd") == "-e|--cwd|"
    assert cli.ok("exec", sb.name, "printf", "%s|", "a", "--", "b") == "a|--|b|"
    proc = cli("exec", "--timeout", "0.5", sb.name, "--", "sleep", "30")
    assert proc.returncode == 124


def test_exec_options_after_the_sandbox_before_the_command(cli: Cli, sb: Sandbox) -> None:
    assert cli.ok("exec", sb.name, "--cwd", "/", "-e", "X=y", "--", "sh", "-c", "echo $X; pwd") == (
        "y\n/\n"
    )
    assert cli.ok("exec", sb.name, "-w/", "pwd") == "/\n"
    assert cli.ok("exec", sb.name, "--cwd=/", "--", "pwd") == "/\n"


def test_exec_unknown_option_is_an_error_not_the_command(cli: Cli, sb: Sandbox) -> None:
    for argv in (
        ("exec", sb.name, "--cwdd", "/", "--", "pwd"),
        ("exec", "--bogus", sb.name, "--", "pwd"),
    ):
        proc = cli(*argv)
        assert proc.returncode == 2, proc
        assert "No such option" in proc.stderr.decode()
        assert proc.stdout == b""


def test_exec_as_root(cli: Cli, sb: Sandbox) -> None:
    me = f"{os.geteuid()}\n"  # a test-mode agent's sandbox user is whoever runs it
    assert cli.ok("exec", sb.name, "--", "id", "-u") == me
    assert cli.ok("exec", "--user", "sandbox", sb.name, "--", "id", "-u") == me
    assert_one_line_error(
        cli("exec", "-u", "nobody", sb.name, "--", "id"), "user", "'root' or 'sandbox'"
    )
    if os.geteuid() != 0:
        pytest.skip("only a root agent can run commands as root")
    assert cli.ok("exec", "-u", "root", sb.name, "--", "id", "-u") == "0\n"
    # Options after the sandbox still belong to the command; piped stdin reaches root too.
    assert cli.ok("exec", "-u", "root", sb.name, "--", "sh", "-c", "id -un; cat", input=b"in") == (
        "root\nin"
    )
    assert cli.ok("exec", sb.name, "echo", "-u", "root") == "-u root\n"


def test_exec_forwards_piped_stdin(cli: Cli, sb: Sandbox) -> None:
    data = bytes(range(256)) * 1000
    proc = cli("exec", sb.name, "--", "sh", "-c", "wc -c; exit 3", input=data)
    assert (proc.returncode, proc.stdout.split()) == (3, [b"256000"])
    assert cli("exec", sb.name, "--", "cat", input=b"\x00binary\xff").stdout == b"\x00binary\xff"
    assert cli("exec", sb.name, "--", "cat", input=b"").stdout == b""
    # No stdin file is left behind in the sandbox.
    assert cli.ok("exec", sb.name, "--", "sh", "-c", "ls -a /tmp | grep -c kiln-stdin || true") == (
        "0\n"
    )


def test_exec_without_stdin_does_not_wait(cli: Cli, sb: Sandbox) -> None:
    proc = cli("exec", sb.name, "--", "cat")  # stdin is /dev/null: nothing is forwarded
    assert (proc.returncode, proc.stdout) == (0, b"")


def test_exec_needs_a_command(cli: Cli, sb: Sandbox) -> None:
    assert_one_line_error(cli("exec", sb.name), "missing the command")


def test_unknown_sandbox_is_one_line_and_non_zero(cli: Cli) -> None:
    for args in (
        ("exec", "no-such-sandbox", "--", "true"),
        ("inspect", "no-such-sandbox"),
        ("file", "ls", "no-such-sandbox"),
        ("ps", "no-such-sandbox"),
    ):
        proc = cli(*args)
        assert proc.returncode == EXIT_CODES["not found"]
        assert_one_line_error(proc, "no-such-sandbox")


def test_dead_daemon_is_one_line_no_traceback(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        for args in (("list",), ("exec", "x", "--", "true"), ("health",)):
            proc = cli("--url", url, *args)
            assert proc.returncode == EXIT_CODES["unreachable"]
            assert_one_line_error(proc, "cannot reach the kiln daemon", url)


def test_wrong_key(cli: Cli) -> None:
    proc = cli("--token", "kiln_wrong", "list")
    assert_one_line_error(proc, "invalid API key", "`kiln config show`")
    assert proc.returncode == EXIT_CODES["unauthorized"]


def test_a_taken_name_is_a_conflict(cli: Cli, sb: Sandbox) -> None:
    proc = cli("create", "--name", sb.name)
    assert_one_line_error(proc, sb.name)
    assert proc.returncode == EXIT_CODES["conflict"]


def test_every_group_answers_to_ls_and_rm(cli: Cli) -> None:
    name = unique("vol")
    cli.ok("volume", "create", name, "--size", "16")
    assert name in cli.ok("volume", "ls")
    assert name in cli.ok("volume", "list")
    cli.ok("volume", "rm", name)
    assert name not in cli.ok("volume", "ls")
    for group in ("secret", "template", "port"):
        assert cli(group, "ls").returncode == 0, group


def test_usage_errors_are_one_line(cli: Cli) -> None:
    proc = cli("create", "--memory", "lots")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--memory")
    assert_one_line_error(cli("no-such-command"), "No such command")


def test_edit_renames(cli: Cli, sb: Sandbox, kiln: Kiln) -> None:
    new = sb.name + "-new"
    out = json.loads(cli.ok("edit", sb.name, "--name", new, "--keep-hot", "--json"))
    assert (out["id"], out["name"], out["keep_hot"]) == (sb.id, new, True)
    assert kiln.sandboxes.get(sb.id).name == new
    assert_one_line_error(cli("edit", new), "nothing to change")


def test_stop_and_start(cli: Cli, sb: Sandbox) -> None:
    assert cli.ok("stop", sb.name) == f"{sb.name}: stopped\n"
    assert cli.ok("start", sb.name) == f"{sb.name}: running\n"


def test_several_sandboxes_at_once_and_json_from_write_commands(cli: Cli, kiln: Kiln) -> None:
    a, b = unique("many"), unique("many")
    ids = [json.loads(cli.ok("create", "--name", n, "--json"))["id"] for n in (a, b)]
    stopped = json.loads(cli.ok("stop", a, b, "--json"))
    assert [(s["id"], s["status"]) for s in stopped] == [(ids[0], "stopped"), (ids[1], "stopped")]
    assert cli.ok("start", a, ids[1]) == f"{a}: running\n{b}: running\n"
    shown = json.loads(cli.ok("inspect", a, b, "--json"))
    assert [s["name"] for s in shown] == [a, b]
    # A missing one is reported and the others still acted on; the status says why.
    proc = cli("inspect", a, "no-such-sandbox", "--json")
    assert proc.returncode == EXIT_CODES["not found"]
    assert [s["name"] for s in json.loads(proc.stdout)] == [a]
    assert_one_line_error(proc, "no-such-sandbox")
    proc = cli("rm", a, "no-such-sandbox", b, "--json")
    assert proc.returncode == EXIT_CODES["not found"]
    assert json.loads(proc.stdout) == [{"deleted": a}, {"deleted": b}]
    assert not {a, b} & {s.name for s in kiln.sandboxes.list()}

    volume = unique("vol")
    cli.ok("volume", "create", volume, "--size", "16")
    assert json.loads(cli.ok("volume", "rm", volume, "--json")) == {"deleted": volume}
    assert json.loads(cli.ok("secret", "set", "S1", "--value", "v", "--json")) == {"name": "S1"}
    assert json.loads(cli.ok("secret", "rm", "S1", "--json")) == {"deleted": "S1"}


def test_file_write_read_ls_stat(cli: Cli, sb: Sandbox, daemon: Daemon, tmp_path: Path) -> None:
    base = daemon.workdir(sb.id)
    payload = b"\x00\x01\xfe binary\n"
    cli.ok("file", "write", sb.name, f"{base}/up/piped.bin", "-", input=payload)
    local = tmp_path / "local.txt"
    local.write_text("line 1\nline 2\nline 3\n")
    cli.ok("file", "write", "--mode", "600", sb.name, f"{base}/up/local.txt", str(local))

    assert cli("file", "read", sb.name, f"{base}/up/piped.bin").stdout == payload
    assert cli.ok("file", "read", sb.name, f"{base}/up/local.txt") == local.read_text()
    assert cli.ok("file", "read", "--limit", "1", sb.name, f"{base}/up/local.txt") == "line 1\n"
    assert cli.ok("file", "read", "--offset", "3", sb.name, f"{base}/up/local.txt") == "line 3\n"

    listing = cli.ok("file", "ls", sb.name, f"{base}/up").splitlines()
    assert [line.split()[-1] for line in listing] == ["local.txt", "piped.bin"]
    assert listing[0].startswith("-rw------- ")
    entries = json.loads(cli.ok("file", "ls", "--json", sb.name, f"{base}/up"))
    assert [(e["name"], e["size"]) for e in entries] == [("local.txt", 21), ("piped.bin", 11)]
    assert json.loads(cli.ok("file", "stat", "--json", sb.name, f"{base}/up"))["is_dir"] is True

    assert_one_line_error(cli("file", "read", sb.name, f"{base}/missing"), "missing")
    assert_one_line_error(
        cli("file", "write", sb.name, f"{base}/x", str(tmp_path / "nope")), "No such file"
    )


def test_file_mkdir_mv_rm_and_ls_depth(cli: Cli, sb: Sandbox, daemon: Daemon) -> None:
    base = daemon.workdir(sb.id)
    assert cli.ok("file", "mkdir", "--mode", "750", sb.name, f"{base}/d/e") == ""
    assert cli("file", "mkdir", sb.name, f"{base}/d/e").stderr.decode().endswith("already exists\n")
    cli.ok("file", "write", sb.name, f"{base}/d/e/f.txt", "-", input=b"x")
    listing = cli.ok("file", "ls", "--depth", "3", sb.name, f"{base}/d").splitlines()
    assert [line.split()[-1] for line in listing] == ["e/", "e/f.txt"]
    assert listing[0].startswith("drwxr-x--- ")
    cli.ok("file", "mv", sb.name, f"{base}/d/e/f.txt", f"{base}/g.txt")
    assert (base / "g.txt").read_text() == "x"
    cli.ok("file", "write", sb.name, f"{base}/h.txt", "-", input=b"y")
    assert_one_line_error(cli("file", "mv", sb.name, f"{base}/h.txt", f"{base}/g.txt"), "exists")
    cli.ok("file", "mv", "-f", sb.name, f"{base}/h.txt", f"{base}/g.txt")
    assert (base / "g.txt").read_text() == "y"
    assert_one_line_error(cli("file", "rm", sb.name, f"{base}/d"), "not empty")
    cli.ok("file", "rm", "-r", sb.name, f"{base}/d", f"{base}/g.txt")
    assert not (base / "d").exists() and not (base / "g.txt").exists()
    assert_one_line_error(cli("file", "rm", sb.name, f"{base}/d"), "No such file")


def test_file_watch_prints_changes(cli: Cli, sb: Sandbox, daemon: Daemon, kiln: Kiln) -> None:
    base = daemon.workdir(sb.id)
    sb.files.mkdir(f"{base}/w")
    env = {**os.environ, "HOME": str(cli.home), **cli.env, "PYTHONPATH": str(SRC)}
    args = [*kiln_argv(), "file", "watch", "--json", sb.name, f"{base}/w"]
    seen = threading.Event()

    def probe() -> None:  # until the watch is on (when, the CLI does not say)
        while not seen.wait(0.2):
            sb.files.write(f"{base}/w/probe", b"p")

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        writer = threading.Thread(target=probe)
        writer.start()
        try:
            first = json.loads(proc.stdout.readline())
        finally:
            seen.set()
            writer.join()
        # "create" if the watch began before the first probe, else "write".
        assert first["name"] == "probe" and first["type"] in ("create", "write")
        sb.files.remove(f"{base}/w", recursive=True)
        rest = [json.loads(line) for line in proc.stdout]  # ends with the directory
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert rest[-1] == {"name": "probe", "type": "remove"}
    assert {e["type"] for e in rest[:-1]} <= {"create", "write"}


def test_ps_lists_the_init_session(cli: Cli, kiln: Kiln) -> None:
    name = unique("ps")
    cli.ok("create", "--name", name, "--init", "echo booted; sleep 600")
    try:
        sessions = json.loads(cli.ok("ps", name, "--json"))
        init = next(s for s in sessions if s["session_id"] == "init")
        assert init["tty"] is True and init["running"] is True
        assert "init" in cli.ok("ps", name)
        cli.ok("kill", name, "init")
    finally:
        kiln.sandboxes.delete(name)


def test_secrets(cli: Cli, kiln: Kiln) -> None:
    name = "CLI_" + unique("s").replace("-", "_").upper()
    assert cli.ok("secret", "set", name, input=b"from stdin\n") == f"secret {name} set\n"
    listed = json.loads(cli.ok("secret", "list", "--json"))
    assert name in [s["name"] for s in listed]
    assert "from stdin" not in cli.ok("secret", "list")
    sandbox = unique()
    cli.ok("create", "--name", sandbox, "--secret", name)
    try:
        assert cli.ok("exec", sandbox, "--", "sh", "-c", f"echo ${name}") == "from stdin\n"
    finally:
        kiln.sandboxes.delete(sandbox)

    proc = cli("secret", "set", name, "--value", "v2")
    assert proc.returncode == 0
    assert b"warning" in proc.stderr
    cli.ok("secret", "delete", name)
    assert name not in cli.ok("secret", "list")
    assert_one_line_error(cli("secret", "delete", name), name)


def test_volumes_and_templates(cli: Cli) -> None:
    vol = unique("vol")
    assert "created" in cli.ok("volume", "create", vol, "--size", "16M")
    assert [
        v["size_mb"] for v in json.loads(cli.ok("volume", "list", "--json")) if v["name"] == vol
    ] == [16]
    cli.ok("volume", "delete", vol)
    assert vol not in cli.ok("volume", "list")

    tpl = unique("tpl")
    cli.ok("template", "create", tpl, "--cpus", "2", "-e", "T=1")
    assert tpl in cli.ok("template", "list")
    sandbox = unique()
    out = json.loads(cli.ok("create", "--name", sandbox, "--template", tpl, "--json"))
    assert out["cpus"] == 2
    cli.ok("rm", sandbox)
    cli.ok("template", "delete", tpl)
    assert tpl not in cli.ok("template", "list")


def test_setup_verifies_and_writes_a_private_config(cli: Cli, daemon: Daemon) -> None:
    no_env = {"KILN_URL": "", "KILN_TOKEN": ""}
    proc = cli("setup", "--url", daemon.url, "--token", "kiln_wrong", env=no_env)
    assert proc.returncode == EXIT_CODES["unauthorized"]
    assert_one_line_error(proc, "invalid API key")
    config = cli.home / ".kiln" / "config.yaml"
    assert not config.exists()

    proc = cli("setup", "--url", daemon.url, env=no_env, input=daemon.token.encode() + b"\n")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(config.read_text()) == {"url": daemon.url, "token": daemon.token}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # The saved config is enough from now on.
    assert cli("list", env=no_env).returncode == 0


def test_setup_against_a_dead_daemon_fails(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        proc = cli("setup", "--url", f"127.0.0.1:{s.getsockname()[1]}", "--token", "k")
    assert_one_line_error(proc, "cannot reach")
    assert not (cli.home / ".kiln" / "config.yaml").exists()


def test_precedence_flag_then_env_then_file(cli: Cli, daemon: Daemon) -> None:
    no_env = {"KILN_URL": "", "KILN_TOKEN": ""}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        config = cli.home / ".kiln" / "config.yaml"
        config.parent.mkdir()
        # The config file names a daemon that is gone; KILN_URL names the live one.
        config.write_text(yaml.safe_dump({"url": dead, "token": "kiln_wrong"}))
        assert cli("list").returncode == 0
        # Without the environment the file is used ...
        assert_one_line_error(cli("list", env=no_env), dead)
        # ... and a flag beats both.
        assert cli("--url", daemon.url, "--token", daemon.token, "list", env=no_env).returncode == 0
        assert_one_line_error(cli("--url", dead, "list"), dead)
        assert_one_line_error(cli("list", env={"KILN_TOKEN": ""}), "invalid API key")


def test_config_show_names_the_winning_source(cli: Cli, daemon: Daemon) -> None:
    shown = json.loads(cli.ok("config", "show", "--json"))
    assert shown["url"] == daemon.url
    assert (shown["url_source"], shown["token_source"]) == ("KILN_URL", "KILN_TOKEN")
    assert daemon.token not in json.dumps(shown)  # masked
    assert shown["config_file_exists"] is False

    config = cli.home / ".kiln" / "config.yaml"
    config.parent.mkdir()
    file = {"url": "http://file.example:1", "token": "kiln_file_token_0123"}
    config.write_text(yaml.safe_dump(file))
    proc = cli("config", "show", env={"KILN_URL": ""})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert "http://file.example:1  [config file]" in text
    assert "[KILN_TOKEN]" in text
    assert str(config) in text
    shown = json.loads(cli.ok("--url", "127.0.0.1:9", "config", "show", "--json"))
    assert (shown["url"], shown["url_source"]) == ("http://127.0.0.1:9", "argument")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_and_what_it_completes(cli: Cli, shell: str) -> None:
    script = cli.ok("completion", shell)
    assert "_KILN_COMPLETE" in script
    # What the script asks the CLI for when the user presses tab after "kiln vol"
    # (fish passes the word being completed, bash and zsh its index).
    cword = "vol" if shell == "fish" else "1"
    proc = cli(
        env={"_KILN_COMPLETE": f"{shell}_complete", "COMP_WORDS": "kiln vol", "COMP_CWORD": cword}
    )
    assert proc.returncode == 0, proc.stderr
    assert "volume" in proc.stdout.decode()
