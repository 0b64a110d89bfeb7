"""The sync SDK against a real daemon over real HTTP (see conftest.py)."""

from __future__ import annotations

import io
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from kiln.sdk import (
    AuthenticationError,
    Conflict,
    ConnectionError,
    Exit,
    FileContent,
    Kiln,
    KilnError,
    NewVolume,
    NotFound,
    Sandbox,
    Stderr,
    Stdout,
    ValidationError,
)

from .conftest import Daemon, unique


def workdir(daemon: Daemon, sb: Sandbox) -> Path:
    """The sandbox's working directory (test-mode agents share the host filesystem)."""
    return daemon.workdir(sb.id)


# -- daemon and errors ----------------------------------------------------------------


def test_health_needs_no_key(daemon: Daemon) -> None:
    with Kiln(daemon.url, "") as anonymous:
        health = anonymous.health()
    assert health.status == "ok"
    assert health.engine == "fake"
    assert health.uptime_s >= 0


def test_wrong_key_is_authentication_error(daemon: Daemon) -> None:
    with Kiln(daemon.url, "kiln_wrong") as k, pytest.raises(AuthenticationError) as info:
        k.sandboxes.list()
    assert info.value.status_code == 401
    assert "invalid API key" in str(info.value)


def test_dead_daemon_is_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with Kiln(f"http://127.0.0.1:{port}", "k") as k, pytest.raises(ConnectionError) as info:
            k.sandboxes.list()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value, KilnError)


def test_unknown_sandbox_is_not_found(kiln: Kiln) -> None:
    with pytest.raises(NotFound, match="no-such-sandbox"):
        kiln.sandboxes.get("no-such-sandbox")
    with pytest.raises(NotFound):
        kiln.sandboxes.ref("no-such-sandbox").exec(["true"])


def test_invalid_fields_are_validation_errors(kiln: Kiln) -> None:
    with pytest.raises(ValidationError) as info:
        kiln.sandboxes.create(name="bad name!")
    assert info.value.status_code == 422
    assert "name" in info.value.message


# -- lifecycle --------------------------------------------------------------------------


def test_create_get_list_update_delete(kiln: Kiln) -> None:
    name = unique("life")
    sb = kiln.sandboxes.create(name=name, cpus=2, memory_mb=256, keep_hot=True)
    try:
        assert (sb.name, sb.cpus, sb.memory_mb, sb.keep_hot) == (name, 2, 256, True)
        assert sb.status == "running" and sb.thermal == "hot"
        assert sb.created_at is not None
        assert kiln.sandboxes.get(name).id == sb.id  # name → id
        assert kiln.sandboxes.get(sb.id).name == name
        assert sb.id in [s.id for s in kiln.sandboxes.list()]

        renamed = sb.update(name=name + "-x", keep_hot=False)
        assert (renamed.id, renamed.name, renamed.keep_hot) == (sb.id, name + "-x", False)
        assert sb.refresh().name == name + "-x"  # methods address the id, not the old name
        with pytest.raises(NotFound):
            kiln.sandboxes.get(name)
    finally:
        sb.delete()
    with pytest.raises(NotFound):
        kiln.sandboxes.get(sb.id)


def test_taken_name_is_conflict(kiln: Kiln, sb: Sandbox) -> None:
    with pytest.raises(Conflict) as info:
        kiln.sandboxes.create(name=sb.name)
    assert info.value.status_code == 409


def test_stop_and_start(sb: Sandbox) -> None:
    stopped = sb.stop()
    assert stopped.status == "stopped"
    started = stopped.start()
    assert started.status == "running"
    assert started.exec(["true"]).exit_code == 0


# -- exec -------------------------------------------------------------------------------


def test_exec_exit_code_and_separate_streams(sb: Sandbox) -> None:
    result = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.exit_code, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert not result.ok


def test_exec_env_cwd_and_shell_string(daemon: Daemon, sb: Sandbox) -> None:
    (workdir(daemon, sb) / "sub").mkdir()
    result = sb.exec("echo $GREETING; pwd", env={"GREETING": "hello"}, cwd="sub")
    assert result.stdout.splitlines() == ["hello", str(workdir(daemon, sb) / "sub")]


def test_exec_and_shell_as_root_or_the_sandbox_user(sb: Sandbox) -> None:
    # Test-mode agents run commands as whoever started them: that is the sandbox user here.
    me = f"{os.geteuid()}\n"
    assert sb.exec(["id", "-u"]).stdout == me
    assert sb.exec(["id", "-u"], user="sandbox").stdout == me
    with sb.exec_stream(["id", "-u"], user="sandbox") as events:
        assert list(events) == [Stdout(me.encode()), Exit(0)]
    if os.geteuid() != 0:
        pytest.skip("only a root agent can run commands as root")
    assert sb.exec(["id", "-u"], user="root").stdout == "0\n"
    with sb.exec_stream(["id", "-un"], user="root") as events:
        assert list(events) == [Stdout(b"root\n"), Exit(0)]
    with sb.shell(cmd="sh", user="root") as shell:
        shell.send("echo uid=$(id -u)=\n")
        _read_until(shell, b"uid=0=")


def test_exec_as_an_unknown_user_is_a_validation_error(sb: Sandbox) -> None:
    for run in (
        lambda: sb.exec(["true"], user="nobody"),
        lambda: list(sb.exec_stream(["true"], user="nobody")),
    ):
        with pytest.raises(ValidationError) as info:
            run()
        assert info.value.status_code == 422
        assert "'root' or 'sandbox'" in info.value.message
    with pytest.raises(KilnError, match="'root' or 'sandbox'") as refused:
        sb.shell(user="nobody")
    assert getattr(refused.value, "status_code", None) == 400


def test_every_option_is_a_field_the_daemon_knows(kiln: Kiln) -> None:
    # The daemon refuses a body field it does not know (422), so every option the
    # SDK offers must become one it knows: set them all once, end to end.
    secret = f"OPT_{secrets.token_hex(4)}"
    kiln.secrets.set(secret, "from-secret")
    vol = kiln.volumes.create(unique("optvol"), size_mb=16)
    tpl = kiln.templates.create(
        unique("opttpl"),
        cpus=1,
        memory_mb=256,
        env={"T": "1"},
        init="true",
        image="minimal",
        volumes={vol.name: "/tpl"},
    )
    new_vol = unique("optnew")
    sb = kiln.sandboxes.create(
        name=unique("opt"),
        cpus=1,
        memory_mb=256,
        env={"E": "1"},
        secrets=[secret],
        init="true",
        keep_hot=True,
        image="minimal",
        volumes={vol.name: "/data"},
        new_volumes=[NewVolume(name=new_vol, size_mb=16, mount="/new")],
    )
    try:
        sb = sb.update(name=unique("renamed"), keep_hot=False)
        options = {"env": {"R": "2"}, "cwd": ".", "timeout_s": 30.0, "user": "sandbox"}
        result = sb.exec(["sh", "-c", "echo $E$R$" + secret], **options)
        assert (result.exit_code, result.stdout) == (0, "12from-secret\n")
        with sb.exec_stream(["sh", "-c", "echo $R"], **options) as events:
            assert list(events) == [Stdout(b"2\n"), Exit(0)]
    finally:
        sb.delete()
    from_template = kiln.sandboxes.create(template=tpl.id)
    from_template.delete()
    kiln.templates.delete(tpl.id)
    kiln.volumes.delete(vol.name)
    kiln.volumes.delete(new_vol)
    kiln.secrets.delete(secret)


def test_exec_timeout(sb: Sandbox) -> None:
    started = time.monotonic()
    result = sb.exec(["sleep", "30"], timeout_s=0.5)
    assert (result.exit_code, result.timed_out) == (124, True)
    assert time.monotonic() - started < 10
    events = list(sb.exec_stream(["sleep", "30"], timeout_s=0.5))
    assert events[-1] == Exit(124, timed_out=True)
    assert not sb.exec(["true"], timeout_s=5).timed_out


def test_exec_stream_events_in_order_with_raw_bytes(sb: Sandbox) -> None:
    script = "printf 'a\\377\\000'; printf 'e' >&2; sleep 0.1; printf b; exit 3"
    with sb.exec_stream(["sh", "-c", script]) as events:
        got = list(events)
    out = b"".join(e.data for e in got if isinstance(e, Stdout))
    err = b"".join(e.data for e in got if isinstance(e, Stderr))
    assert (out, err) == (b"a\xff\x00b", b"e")
    assert got[-1] == Exit(3)
    assert events.exit_code == 3


def test_exec_stream_arrives_live(sb: Sandbox) -> None:
    stream = sb.exec_stream(["sh", "-c", "echo first; sleep 2; echo second"])
    started = time.monotonic()
    first = next(iter(stream))
    assert first == Stdout(b"first\n")
    assert time.monotonic() - started < 1.5  # before the command ends
    assert stream.wait() == 0


def test_closing_a_stream_kills_the_command(daemon: Daemon, sb: Sandbox) -> None:
    marker = workdir(daemon, sb) / "marker"
    with sb.exec_stream(["sh", "-c", f"echo go; sleep 1; touch {marker}"]) as events:
        assert next(events) == Stdout(b"go\n")
    time.sleep(1.5)
    assert not marker.exists()


def test_exec_stream_unknown_sandbox(kiln: Kiln) -> None:
    with pytest.raises(NotFound):
        list(kiln.sandboxes.ref("nope-nope").exec_stream(["true"]))


# -- files ------------------------------------------------------------------------------


def test_write_read_stat_ls(daemon: Daemon, sb: Sandbox) -> None:
    base = workdir(daemon, sb)
    sb.files.write(f"{base}/dir/a.bin", b"\x00\x01binary", mode=0o600)
    sb.files.write(f"{base}/dir/b.txt", "héllo\n")
    sb.files.write(f"{base}/dir/c.dat", io.BytesIO(b"x" * 300_000))

    assert sb.files.read(f"{base}/dir/a.bin") == FileContent(b"\x00\x01binary", 8, False)
    assert sb.files.read(f"{base}/dir/b.txt").text == "héllo\n"
    assert sb.files.read(f"{base}/dir/c.dat").data == b"x" * 300_000

    stat = sb.files.stat(f"{base}/dir/a.bin")
    assert (stat.size, stat.mode, stat.is_dir) == (8, "0600", False)
    assert sb.files.stat(f"{base}/dir").is_dir

    listing = sb.files.ls(f"{base}/dir")
    assert [e.name for e in listing.entries] == ["a.bin", "b.txt", "c.dat"]
    assert not listing.truncated
    assert (base / "dir" / "b.txt").read_text() == "héllo\n"


def test_truncated_reads(daemon: Daemon, sb: Sandbox) -> None:
    path = f"{workdir(daemon, sb)}/lines.txt"
    sb.files.write(path, "".join(f"line {i}\n" for i in range(1, 101)))
    head = sb.files.read(path, limit=2)
    assert (head.data, head.size, head.truncated) == (b"line 1\nline 2\n", 792, True)
    assert sb.files.read(path, offset=100).data == b"line 100\n"
    assert sb.files.read(path, max_bytes=4).data == b"line"
    assert not sb.files.read(path, max_bytes=10_000).truncated


def test_missing_file_is_not_found(daemon: Daemon, sb: Sandbox) -> None:
    with pytest.raises(NotFound):
        sb.files.read(f"{workdir(daemon, sb)}/missing")
    with pytest.raises(NotFound):
        sb.files.stat(f"{workdir(daemon, sb)}/missing")


def test_mkdir_move_remove_and_depth(daemon: Daemon, sb: Sandbox) -> None:
    base = workdir(daemon, sb)
    assert sb.files.mkdir(f"{base}/tree/sub", mode=0o750) is True
    assert sb.files.mkdir(f"{base}/tree/sub") is False
    sb.files.write(f"{base}/tree/sub/f.txt", "x")
    listing = sb.files.ls(f"{base}/tree", depth=2)
    assert [e.path for e in listing.entries] == [f"{base}/tree/sub", f"{base}/tree/sub/f.txt"]
    info = sb.files.move(f"{base}/tree/sub/f.txt", f"{base}/moved/g.txt")
    assert (info.name, info.path, info.size) == ("g.txt", f"{base}/moved/g.txt", 1)
    sb.files.write(f"{base}/other", "y")
    with pytest.raises(Conflict):
        sb.files.move(f"{base}/other", f"{base}/moved/g.txt")
    sb.files.move(f"{base}/other", f"{base}/moved/g.txt", overwrite=True)
    assert sb.files.read(f"{base}/moved/g.txt").data == b"y"
    with pytest.raises(Conflict):
        sb.files.mkdir(f"{base}/moved/g.txt")
    with pytest.raises(ValidationError):
        sb.files.remove(f"{base}/tree")  # not empty
    sb.files.remove(f"{base}/tree", recursive=True)
    with pytest.raises(NotFound):
        sb.files.remove(f"{base}/tree")
    assert not (base / "tree").exists()


def test_watch(daemon: Daemon, sb: Sandbox) -> None:
    base = workdir(daemon, sb)
    sb.files.mkdir(f"{base}/watched")
    with sb.files.watch(f"{base}/watched", recursive=True) as watch:
        sb.files.write(f"{base}/watched/a.txt", "a")
        sb.files.remove(f"{base}/watched", recursive=True)
        events = [(e.name, e.type) for e in watch]  # ends with the directory
    assert events == [("a.txt", "create"), ("a.txt", "write"), ("a.txt", "remove")]
    with pytest.raises(NotFound):
        sb.files.watch(f"{base}/watched").start()


# -- sessions and shells ----------------------------------------------------------------


def _read_until(shell: object, needle: bytes, timeout: float = 10) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"never saw {needle!r} in {seen[-300:]!r}"
        chunk = shell.recv(timeout=0.2)  # type: ignore[attr-defined]
        assert chunk is not None, f"closed before {needle!r}: {seen[-300:]!r}"
        seen += chunk
    return seen


def test_shell_detach_reattach_and_exit(sb: Sandbox) -> None:
    with sb.shell(cmd="sh", rows=30, cols=100) as shell:
        session_id = shell.session_id
        assert session_id
        shell.send("echo $((6 * 7))\n")
        _read_until(shell, b"42")
        shell.resize(40, 120)
        shell.send("stty size\n")
        _read_until(shell, b"40 120")
    # Detached: the session keeps running.
    listed = {s.session_id: s for s in sb.sessions.list()}
    assert listed[session_id].running and listed[session_id].tty

    with sb.shell(session_id=session_id) as again:
        _read_until(again, b"42")  # the scrollback replays
        again.send("exit 3\n")
        while again.recv(timeout=5) is not None:
            pass
        assert again.exit_code == 3


def test_kill_session(sb: Sandbox) -> None:
    with sb.shell(cmd="sleep 600") as shell:
        session_id = shell.session_id
    assert session_id is not None
    sb.sessions.kill(session_id)
    deadline = time.monotonic() + 5
    while any(s.session_id == session_id and s.running for s in sb.sessions.list()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_shell_on_unknown_sandbox(kiln: Kiln) -> None:
    with pytest.raises(NotFound):
        kiln.sandboxes.ref("nope-nope").shell()


def test_ports_lists(sb: Sandbox) -> None:
    assert isinstance(sb.ports(), list)


# -- secrets, volumes, templates --------------------------------------------------------


def test_secrets_reach_the_sandbox_env_and_are_never_listed(kiln: Kiln) -> None:
    name = "KILN_TEST_" + unique("s").replace("-", "_").upper()
    kiln.secrets.set(name, "s3cret value")
    try:
        listed = [s for s in kiln.secrets.list() if s.name == name]
        assert len(listed) == 1 and listed[0].created_at is not None
        assert "s3cret" not in repr(kiln.secrets.list())
        sb = kiln.sandboxes.create(name=unique(), secrets=[name], env={"PLAIN": "1"})
        try:
            assert sb.exec(f"echo ${name} $PLAIN").stdout == "s3cret value 1\n"
        finally:
            sb.delete()
    finally:
        kiln.secrets.delete(name)
    assert name not in [s.name for s in kiln.secrets.list()]
    with pytest.raises(NotFound):
        kiln.secrets.delete(name)


def test_volumes(kiln: Kiln) -> None:
    name = unique("vol")
    vol = kiln.volumes.create(name, size_mb=16)
    assert (vol.name, vol.size_mb, vol.attached_to) == (name, 16, None)
    assert kiln.volumes.get(name).name == name
    assert name in [v.name for v in kiln.volumes.list()]
    with pytest.raises(Conflict):
        kiln.volumes.create(name, size_mb=16)
    kiln.volumes.delete(name)
    with pytest.raises(NotFound):
        kiln.volumes.get(name)


def test_templates(kiln: Kiln) -> None:
    name = unique("tpl")
    tpl = kiln.templates.create(name, cpus=2, memory_mb=256, env={"FROM_TEMPLATE": "yes"})
    assert (tpl.name, tpl.cpus, tpl.memory_mb, dict(tpl.env)) == (
        name,
        2,
        256,
        {"FROM_TEMPLATE": "yes"},
    )
    assert kiln.templates.get(tpl.id).name == name
    assert tpl.id in [t.id for t in kiln.templates.list()]
    sb = kiln.sandboxes.create(name=unique(), template=tpl.id)
    try:
        assert (sb.cpus, sb.memory_mb) == (2, 256)
        assert sb.exec("echo $FROM_TEMPLATE").stdout == "yes\n"
    finally:
        sb.delete()
    kiln.templates.delete(tpl.id)
    with pytest.raises(NotFound):
        kiln.templates.get(tpl.id)
