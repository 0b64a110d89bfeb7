"""Piped exec as another user: ids, errors and exit statuses as root's.

The test-mode agent runs as root here and switches to the user a request names,
as a VM agent (PID 1, root) does for the sandbox user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

from ._wire import run, wait_for, zombie_children
from .conftest import Guest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def user_with_groups() -> pwd.struct_passwd:
    """A user with supplementary groups if the system has one (so `id -G` says something)."""
    for entry in pwd.getpwall():
        if entry.pw_uid != 0 and len(set(os.getgrouplist(entry.pw_name, entry.pw_gid))) > 1:
            return entry
    return pwd.getpwnam("nobody")


async def test_ids_output_and_exit_code(guest: Guest) -> None:
    user = user_with_groups()
    script = "id -u; id -g; id -G; echo out; echo err >&2; exit 3"
    result = await run(guest, ["sh", "-c", script], user=user.pw_name)
    uid, gid, groups, out = result.stdout.decode().splitlines()
    assert (int(uid), int(gid)) == (user.pw_uid, user.pw_gid)
    assert {int(g) for g in groups.split()} == set(os.getgrouplist(user.pw_name, user.pw_gid))
    assert (out, result.stderr, result.code) == ("out", b"err\n", 3)


async def test_missing_command(guest: Guest) -> None:
    as_root = await run(guest, ["kiln-no-such-command"])
    as_user = await run(guest, ["kiln-no-such-command"], user="nobody")
    assert (as_user.code, as_user.stderr) == (as_root.code, as_root.stderr)
    assert as_user.code == 127
    assert as_user.stderr == b"kiln: kiln-no-such-command: command not found\n"


async def test_missing_cwd(guest: Guest, workdir: Path) -> None:
    cwd = str(workdir / "nope")
    as_root = await run(guest, ["true"], cwd=cwd)
    as_user = await run(guest, ["true"], cwd=cwd, user="nobody")
    assert (as_user.code, as_user.stderr) == (as_root.code, as_root.stderr)
    assert as_user.code == 126
    assert (
        as_user.stderr
        == f"kiln: cannot change directory to {cwd}: No such file or directory\n".encode()
    )


async def test_not_executable(guest: Guest, workdir: Path) -> None:
    script = workdir / "script.sh"
    script.write_text("#!/bin/sh\necho should-not-run\n")
    script.chmod(0o744)  # executable by root only
    result = await run(guest, [str(script)], user="nobody")
    assert result.code == 126
    assert result.stderr == f"kiln: {script}: cannot execute: Permission denied\n".encode()


async def test_concurrent_execs_keep_their_statuses_with_the_reaper(
    make_agent: Callable[..., Guest],
) -> None:
    """User switches mixed with root's execs while orphans (background sleeps) keep dying."""
    agent = make_agent(extra=["--reap-orphans"])
    user = pwd.getpwnam("nobody")

    async def one(i: int) -> tuple[int | None, bytes]:
        script = f"(sleep 0.0{i % 10} </dev/null >/dev/null 2>&1 &); id -u; exit {i}"
        as_user = {"user": "nobody"} if i % 4 else {}
        result = await run(agent, ["sh", "-c", script], **as_user)
        return result.code, result.stdout

    for _ in range(3):
        results = await asyncio.gather(*(one(i) for i in range(1, 41)))
        expected = [(i, f"{user.pw_uid if i % 4 else 0}\n".encode()) for i in range(1, 41)]
        assert results == expected
    await wait_for(lambda: not zombie_children(agent.pid))
