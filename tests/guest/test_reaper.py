"""The orphan reaper (PID 1's duty), exercised as a subreaper (--reap-orphans):
orphans are reaped, and the exit status of the agent's own children is never stolen."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ._wire import process_alive, run, wait_for, zombie_children
from .conftest import Guest


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split()[1])


async def test_orphans_are_adopted_and_reaped(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--reap-orphans"])
    # The subshell exits at once, orphaning a sleep that outlives the exec itself.
    script = "(sleep 0.5 </dev/null >/dev/null 2>&1 & echo $!); exit 3"
    result = await run(agent, ["sh", "-c", script])
    assert result.code == 3
    orphan = int(result.stdout)
    assert process_alive(orphan)
    assert parent_of(orphan) == agent.pid  # adopted by the agent, as by PID 1
    await wait_for(lambda: not process_alive(orphan))
    await wait_for(lambda: not zombie_children(agent.pid))


async def test_reaper_never_steals_exit_statuses(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--reap-orphans"])

    async def one(i: int) -> int | None:
        script = f"(sleep 0.0{i % 10} </dev/null >/dev/null 2>&1 &); exit {i}"
        return (await run(agent, ["sh", "-c", script])).code

    for _ in range(3):
        codes = await asyncio.gather(*(one(i) for i in range(1, 21)))
        assert codes == list(range(1, 21))
    await wait_for(lambda: not zombie_children(agent.pid))
