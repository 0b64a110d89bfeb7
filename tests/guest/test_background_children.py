"""A piped exec returns once its command has exited and its stdout/stderr are
closed, whatever the command left running in the background and whoever runs it.

The regression: commands started through a spawner (another user than the
agent's) inherited a second, inheritable copy of their own pipes, so a
background child that redirected its output still held the exec's stdout and
stderr and the exec never ended.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from ._wire import process_alive, run
from .conftest import Guest

# None: the agent's own user (root here: subprocess); "nobody": a spawner.
USERS = [None, pytest.param("nobody", marks=pytest.mark.skipif(os.geteuid() != 0, reason="root"))]

#: Each prints the pid of the process it leaves running in the background.
BACKGROUND = {
    "nohup": "nohup sleep 1000 >/dev/null 2>&1 & echo $!",
    "setsid": "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
    "subshell": "(sleep 1000 </dev/null >/dev/null 2>&1 & echo $!)",
    # The classic daemon: fork, setsid, fork again, descriptors onto /dev/null.
    "double-fork": (
        "exec python3 -c 'import os\n"
        "if os.fork(): os._exit(0)\n"
        "os.setsid()\n"
        "pid = os.fork()\n"
        "if pid: print(pid, flush=True); os._exit(0)\n"
        'null = os.open("/dev/null", os.O_RDWR)\n'
        "for fd in range(3): os.dup2(null, fd)\n"
        'os.execvp("sleep", ["sleep", "1000"])\''
    ),
    "log-file": "sleep 1000 >/tmp/kiln-bg-$$.log 2>&1 & echo $!; rm -f /tmp/kiln-bg-$$.log",
}


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    pids: list[int] = []
    try:
        yield pids
    finally:
        for pid in pids:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("script", BACKGROUND.values(), ids=BACKGROUND.keys())
async def test_background_child_does_not_hold_the_exec(
    guest: Guest, user: str | None, script: str, leftovers: list[int]
) -> None:
    fields = {} if user is None else {"user": user}
    started = time.monotonic()
    result = await run(guest, ["sh", "-c", script], within=5, **fields)
    elapsed = time.monotonic() - started
    pid = int(result.stdout.split()[0])
    leftovers.append(pid)
    assert result.code == 0, result
    assert elapsed < 3, f"exec took {elapsed:.1f} s"
    assert process_alive(pid), "the background child should keep running"


@pytest.mark.parametrize("user", USERS)
async def test_only_the_three_standard_descriptors_reach_the_command(
    guest: Guest, user: str | None
) -> None:
    fields = {} if user is None else {"user": user}
    # ls runs in the command itself: the descriptors it lists are its own (3 is ls's directory).
    result = await run(guest, ["ls", "/proc/self/fd"], **fields)
    assert result.code == 0, result
    assert sorted(int(fd) for fd in result.stdout.split()) == [0, 1, 2, 3]


@pytest.mark.parametrize("user", USERS)
async def test_background_child_holding_stdout_holds_the_exec_until_it_closes_it(
    guest: Guest, user: str | None
) -> None:
    """``X &`` without redirects shares the exec's stdout: the exec ends when X
    closes it (here when X exits), and X's output is part of the result."""
    fields = {} if user is None else {"user": user}
    started = time.monotonic()
    result = await run(guest, ["sh", "-c", "(sleep 0.5; echo late) & echo early"], **fields)
    elapsed = time.monotonic() - started
    assert (result.code, result.stdout) == (0, b"early\nlate\n")
    assert elapsed >= 0.5
