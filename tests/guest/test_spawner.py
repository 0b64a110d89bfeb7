"""Spawners: commands as another user start in a helper running as that user.

A real test-mode agent as root (as a VM agent is) and real helper processes;
the in-process tests drive :class:`Spawners` on this test's own event loop.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.guest import spawner as spawner_module
from kiln.guest.context import GuestContext, Settings, UserInfo
from kiln.guest.process import Children
from kiln.guest.spawner import Credentials, Spawners
from kiln.protocol import FrameType, decode_exit

from ._wire import Conn, collect, exec_req, processes, run, wait_for
from .conftest import Guest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def spawners_of(agent_pid: int) -> list[int]:
    """The agent's children named kiln-spawner."""
    return [p.pid for p in processes() if p.comm == "kiln-spawner" and p.ppid == agent_pid]


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


async def test_a_user_command_is_a_child_of_that_users_spawner(
    make_agent: Callable[..., Guest],
) -> None:
    agent = make_agent(extra=["--reap-orphans"])
    result = await run(agent, ["sh", "-c", "echo $PPID; id -u; exit 4"], user="nobody")
    ppid, uid = result.stdout.decode().split()
    assert (int(uid), result.code) == (nobody().pw_uid, 4)
    assert spawners_of(agent.pid) == [int(ppid)]
    assert real_uid(int(ppid)) == nobody().pw_uid
    # Root's own commands still start from the agent itself (vfork, no helper needed).
    as_root = await run(agent, ["sh", "-c", "echo $PPID"])
    assert int(as_root.stdout) == agent.pid


async def test_a_user_terminal_session_starts_from_the_spawner(
    make_agent: Callable[..., Guest],
) -> None:
    """A TTY session as the user: a new session led by the command, whose controlling
    terminal is the pty (so /dev/tty opens and job control works), started by the spawner."""
    agent = make_agent(extra=["--reap-orphans"])
    script = (
        'cat /proc/$PPID/comm; id -u; echo "sid=$(ps -o sid= -p $$ | tr -d " ") pid=$$"; '
        "ps -o tty= -p $$; echo via-dev-tty > /dev/tty; exit 3"
    )
    async with await Conn.open(agent.control, agent.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["sh", "-c", script], tty=True, user="nobody"))
        result = await collect(conn)
    lines = result.stdout.decode().replace("\r", "").splitlines()
    comm, uid, ids, tty, via = lines[-5:]
    assert (comm, int(uid), result.code) == ("kiln-spawner", nobody().pw_uid, 3)
    sid, pid = (int(part.split("=")[1]) for part in ids.split())
    assert sid == pid  # the session leader
    assert tty.strip().startswith("pts/")
    assert via == "via-dev-tty"


async def test_the_user_cannot_inspect_its_spawner(make_agent: Callable[..., Guest]) -> None:
    """Switching user made the spawner non-dumpable: same uid, yet no /proc access."""
    agent = make_agent(extra=["--reap-orphans"])
    await run(agent, ["true"], user="nobody")
    (helper,) = spawners_of(agent.pid)
    result = await run(
        agent, ["sh", "-c", f"ls /proc/{helper}/fd; cat /proc/{helper}/environ"], user="nobody"
    )
    assert result.code != 0
    assert b"Permission denied" in result.stderr


async def test_a_killed_spawner_loses_no_exit_code(make_agent: Callable[..., Guest]) -> None:
    """The spawner dies while its command runs: the command is adopted, its status kept;
    the next command gets a new spawner."""
    agent = make_agent(extra=["--reap-orphans"])
    async with await Conn.open(agent.control, agent.token) as conn:
        await conn.send(
            FrameType.EXEC_REQ,
            exec_req(["sh", "-c", "echo started; read line; exit 7"], user="nobody"),
        )
        frame = await conn.recv()
        assert frame is not None and frame.payload == b"started\n"
        (helper,) = spawners_of(agent.pid)
        os.kill(helper, signal.SIGKILL)
        await wait_for(lambda: helper not in spawners_of(agent.pid))
        await conn.send(FrameType.STDIN, b"go\n")
        frame = await conn.recv()
        assert frame is not None and frame.type == FrameType.EXIT
        assert decode_exit(frame.payload) == 7
    again = await run(agent, ["id", "-u"], user="nobody")
    assert (again.code, int(again.stdout)) == (0, nobody().pw_uid)
    (new_helper,) = spawners_of(agent.pid)
    assert new_helper != helper


async def test_a_large_environment_bypasses_the_spawner(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--reap-orphans"])
    # Two variables: one string may not exceed 128 KiB (the kernel's MAX_ARG_STRLEN).
    half = "x" * (spawner_module.MAX_MESSAGE // 2 + 1)
    result = await run(
        agent,
        ["sh", "-c", "echo $PPID $((${#A} + ${#B})); id -u"],
        env={"A": half, "B": half},
        user="nobody",
    )
    ppid, size, uid = result.stdout.decode().split()
    assert (int(ppid), int(size), int(uid)) == (agent.pid, 2 * len(half), nobody().pw_uid)


async def test_errors_match_the_agents_own(make_agent: Callable[..., Guest]) -> None:
    """What cannot start says why, as a command root starts does."""
    agent = make_agent(extra=["--reap-orphans"])
    for cmd, code in ((["kiln-no-such-command"], 127), (["/etc"], 126), (["/etc/passwd"], 126)):
        as_user = await run(agent, cmd, user="nobody")
        as_root = await run(agent, cmd)
        assert (as_user.code, as_user.stderr) == (code, as_root.stderr), cmd
    bad = await run(agent, ["echo", "a\0b"], user="nobody")
    assert bad.error is not None and "null" in bad.error
    # A cwd the user may not enter: refused as the user would be by `cd`.
    private = Path(agent.workdir) / "private"
    private.mkdir(mode=0o700)
    result = await run(agent, ["true"], cwd=str(private), user="nobody")
    assert result.code == 126
    assert b"cannot change directory" in result.stderr


# ---- in-process: the pool of spawners ----------------------------------------------


def creds_of(entry: pwd.struct_passwd, *groups: int) -> Credentials:
    return Credentials(entry.pw_uid, entry.pw_gid, (entry.pw_gid, *groups))


async def output_of(spawners: Spawners, creds: Credentials, argv: list[str]) -> tuple[int, bytes]:
    read_end, write_end = os.pipe()
    try:
        child = await spawners.get(creds).spawn(
            argv, stdin=0, stdout=write_end, stderr=2, cwd="/", env={"PATH": "/usr/bin:/bin"}
        )
    finally:
        os.close(write_end)
    code = await asyncio.wait_for(child.wait(), 10)
    with os.fdopen(read_end, "rb") as f:
        return code, f.read()


async def test_new_groups_retire_the_old_spawner() -> None:
    """The user database changed (new groups): the old helper goes, a new one serves."""
    spawners = Spawners(Children())
    try:
        first = creds_of(nobody())
        code, out = await output_of(spawners, first, ["id", "-G"])
        assert (code, out.split()) == (0, [str(nobody().pw_gid).encode()])
        old = spawners.get(first)
        changed = creds_of(nobody(), 4242)
        code, out = await output_of(spawners, changed, ["id", "-G"])
        assert {int(g) for g in out.split()} == {nobody().pw_gid, 4242}
        await asyncio.wait_for(old.process.wait(), 10)  # the retired helper exited
        assert spawners.get(changed) is not old
    finally:
        spawners.close()


async def test_a_spawner_that_cannot_start_falls_back_to_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A helper that dies before it is ready (here: it cannot switch user) started
    nothing: the command starts from the agent itself, and after a few failed
    helpers the agent stops trying."""

    def refuse(*_ids: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setresuid", refuse)  # inherited by the forked helper only
    user = UserInfo.from_pwd(nobody())
    ctx = GuestContext(Settings(test_mode=True, workdir="/", user=user), Children())
    assert ctx.spawners is not None
    try:
        for _ in range(spawner_module.MAX_START_FAILURES + 1):
            read_end, write_end = os.pipe()
            child = await ctx.start_command(
                ["sh", "-c", "echo $PPID; id -u"],
                user,
                stdin=0,
                stdout=write_end,
                stderr=2,
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
            )
            os.close(write_end)
            assert await asyncio.wait_for(child.wait(), 10) == 0
            with os.fdopen(read_end, "rb") as f:
                ppid, uid = f.read().split()
            assert (int(ppid), int(uid)) == (os.getpid(), user.uid)
        with pytest.raises(spawner_module.SpawnerUnavailable):
            ctx.spawners.get(creds_of(nobody()))
    finally:
        ctx.spawners.close()
