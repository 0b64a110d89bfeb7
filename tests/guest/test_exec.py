"""Piped exec against a real test-mode agent."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.guest.__main__ import _settings, build_parser
from kiln.guest.config import GuestConfig
from kiln.guest.context import UserInfo
from kiln.protocol import CHUNK_SIZE, FrameType

from ._wire import Conn, collect, exec_req, process_alive, run, wait_for
from .conftest import Guest


async def test_echo(guest: Guest) -> None:
    result = await run(guest, ["echo", "hello", "world"])
    assert result.error is None
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert result.code == 0
    assert result.frames[-1].type == FrameType.EXIT


@pytest.mark.parametrize("code", [0, 1, 42, 255])
async def test_exit_codes(guest: Guest, code: int) -> None:
    result = await run(guest, ["sh", "-c", f"exit {code}"])
    assert result.code == code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
async def test_killed_by_signal_is_128_plus_n(guest: Guest, sig: signal.Signals) -> None:
    result = await run(guest, ["sh", "-c", f"kill -{int(sig)} $$"])
    assert result.code == 128 + sig


async def test_command_not_found_is_127_with_message(guest: Guest) -> None:
    result = await run(guest, ["kiln-no-such-command"])
    assert result.code == 127
    assert b"kiln-no-such-command" in result.stderr
    assert b"not found" in result.stderr


async def test_not_executable_is_126(guest: Guest, workdir: Path) -> None:
    script = workdir / "script.sh"
    script.write_text("#!/bin/sh\necho should-not-run\n")
    script.chmod(0o644)
    result = await run(guest, [str(script)])
    assert result.code == 126
    assert b"should-not-run" not in result.stdout
    assert result.stderr  # a message, not a silent failure


async def test_directory_as_command_is_126(guest: Guest, workdir: Path) -> None:
    result = await run(guest, [str(workdir)])
    assert result.code == 126


async def test_missing_cwd_is_126_with_message(guest: Guest, workdir: Path) -> None:
    result = await run(guest, ["true"], cwd=str(workdir / "nope"))
    assert result.code == 126
    assert b"nope" in result.stderr


async def test_stderr_is_separate_from_stdout(guest: Guest) -> None:
    result = await run(guest, ["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert result.stdout == b"out\nout2\n"
    assert result.stderr == b"err\n"
    types = {f.type for f in result.frames[:-1]}
    assert types == {FrameType.STDOUT, FrameType.STDERR}


async def test_request_env_and_defaults(guest: Guest) -> None:
    result = await run(
        guest,
        ["sh", "-c", 'printf "%s|%s|%s|%s|%s" "$FOO" "$PATH" "$HOME" "$TERM" "$LANG"'],
        env={"FOO": "bar baz"},
    )
    foo, path, home, term, lang = result.stdout.decode().split("|")
    assert foo == "bar baz"
    assert "/usr/bin" in path.split(":")
    assert home
    assert term
    assert lang == "C.UTF-8"


async def test_env_precedence_defaults_sandbox_request(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(config={"env": {"LANG": "sandbox-lang", "A": "sandbox", "B": "sandbox"}})
    result = await run(agent, ["sh", "-c", 'printf "%s|%s|%s" "$LANG" "$A" "$B"'], env={"B": "req"})
    assert result.stdout == b"sandbox-lang|sandbox|req"


async def test_default_cwd_is_the_workdir(guest: Guest) -> None:
    result = await run(guest, ["pwd"])
    assert Path(result.stdout.decode().strip()) == guest.workdir


async def test_explicit_and_relative_cwd(guest: Guest, workdir: Path) -> None:
    result = await run(guest, ["pwd"], cwd=str(workdir))
    assert Path(result.stdout.decode().strip()) == workdir
    result = await run(guest, ["pwd"], cwd=workdir.name)  # relative to the workdir
    assert Path(result.stdout.decode().strip()) == workdir


async def test_stdin_frames_then_eof(guest: Guest) -> None:
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["cat"]))
        await conn.send(FrameType.STDIN, b"one ")
        await conn.send(FrameType.STDIN, b"two")
        await conn.send(FrameType.STDIN, b"")
        result = await collect(conn)
    assert result.stdout == b"one two"
    assert result.code == 0


async def test_large_stdin_round_trip(guest: Guest) -> None:
    data = os.urandom(3 * 1024 * 1024)
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["sh", "-c", "cat | sha256sum"]))
        for i in range(0, len(data), 100_000):
            await conn.send(FrameType.STDIN, data[i : i + 100_000])
        await conn.send(FrameType.STDIN, b"")
        result = await collect(conn)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_one_megabyte_of_output_is_intact(guest: Guest, workdir: Path) -> None:
    data = os.urandom(1024 * 1024 + 17)
    (workdir / "blob").write_bytes(data)
    result = await run(guest, ["cat", str(workdir / "blob")])
    assert result.code == 0
    assert result.stdout == data
    assert all(len(f.payload) <= CHUNK_SIZE for f in result.frames)


async def test_kill_during_exec(guest: Guest) -> None:
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["sh", "-c", "echo started; exec sleep 30"]))
        assert (await conn.expect(FrameType.STDOUT)).payload == b"started\n"
        await conn.send(FrameType.KILL)
        result = await collect(conn, within=5)
    assert result.code == 128 + signal.SIGKILL


async def test_kill_takes_the_whole_process_group(guest: Guest) -> None:
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(
            FrameType.EXEC_REQ, exec_req(["sh", "-c", "sleep 30 & echo $!; sleep 30; wait"])
        )
        grandchild = int((await conn.expect(FrameType.STDOUT)).payload)
        assert process_alive(grandchild)
        await conn.send(FrameType.KILL)
        result = await collect(conn, within=5)
    assert result.code == 137
    await wait_for(lambda: not process_alive(grandchild))


async def test_host_disconnect_kills_the_group(guest: Guest) -> None:
    conn = await Conn.open(guest.control, guest.token)
    await conn.send(
        FrameType.EXEC_REQ, exec_req(["sh", "-c", "sleep 30 & echo $! $$; sleep 30; wait"])
    )
    pids = [int(p) for p in (await conn.expect(FrameType.STDOUT)).payload.split()]
    assert all(process_alive(p) for p in pids)
    await conn.close()
    await wait_for(lambda: not any(process_alive(p) for p in pids))


async def test_command_writes_are_visible_when_exit_arrives(guest: Guest, workdir: Path) -> None:
    target = workdir / "written"
    result = await run(guest, ["sh", "-c", f"printf data > {target}"])
    assert result.code == 0
    assert target.read_bytes() == b"data"


async def test_sync_before_exit_when_enabled(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--sync"])  # test mode skips it by default; VMs always sync
    results = await asyncio.gather(*(run(agent, ["sh", "-c", f"exit {i}"]) for i in range(8)))
    assert [r.code for r in results] == list(range(8))


@pytest.mark.parametrize(
    ("argv", "test_mode", "expected"),
    [([], True, False), ([], False, True), (["--sync"], True, True), (["--no-sync"], False, False)],
)
def test_sync_defaults(argv: list[str], test_mode: bool, expected: bool) -> None:
    args = build_parser().parse_args(argv)
    settings = _settings(
        args, GuestConfig(), test_mode=test_mode, user=UserInfo.current(), workdir="/"
    )
    assert settings.durable is expected


async def test_ten_concurrent_execs(guest: Guest) -> None:
    results = await asyncio.gather(
        *(run(guest, ["sh", "-c", f"echo {i}; echo e{i} >&2; exit {i}"]) for i in range(10))
    )
    for i, result in enumerate(results):
        assert (result.stdout, result.stderr, result.code) == (
            f"{i}\n".encode(),
            f"e{i}\n".encode(),
            i,
        )


async def test_unknown_user_is_an_error(guest: Guest) -> None:
    result = await run(guest, ["true"], user="kiln-no-such-user")
    assert result.code is None
    assert result.error is not None and "kiln-no-such-user" in result.error


async def test_empty_cmd_is_an_error(guest: Guest) -> None:
    result = await run(guest, [])
    assert result.error is not None and "cmd" in result.error


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
async def test_run_as_another_user(guest: Guest) -> None:
    """The privilege drop a VM agent (root) does for the sandbox user, with nobody here."""
    result = await run(guest, ["sh", "-c", 'id -u; id -g; echo "$HOME $USER"'], user="nobody")
    uid, gid, rest = result.stdout.decode().splitlines()
    assert (int(uid), result.code) == (65534, 0)
    assert int(gid) != 0
    assert rest.endswith(" nobody")
    # A TTY as well: the pty is handed over, so /dev/tty opens for the new user.
    async with await Conn.open(guest.control, guest.token) as conn:
        cmd = ["sh", "-c", "exec </dev/tty && id -u"]
        await conn.send(FrameType.EXEC_REQ, exec_req(cmd, tty=True, user="nobody"))
        result = await collect(conn)
    assert b"65534" in result.stdout and result.code == 0
