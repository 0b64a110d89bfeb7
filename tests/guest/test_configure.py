"""CONFIGURE on a running agent (test mode: the agent's own settings only; the
machine's part -- clock, hostname, files -- is tested on real VMs in
tests/engine/test_pool.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kiln.agent_client import AgentClient, AuthError, RemoteError

from .conftest import Guest


def client(agent: Guest, token: str | None) -> AgentClient:
    return AgentClient.unix_dir(agent.proc.socket_dir, token)


async def test_configure_replaces_env_and_token_and_starts_init(
    make_agent: Callable[..., Guest],
) -> None:
    agent = make_agent(config={"env": {"OLD": "member"}})
    await client(agent, agent.token).configure(
        {"token": "new-token", "env": {"WHO": "alice"}, "init": "sleep 60"}
    )
    fresh = client(agent, "new-token")
    result = await fresh.exec(["sh", "-c", 'echo "$WHO/${OLD:-none}"'])
    assert result.stdout == b"alice/none\n"
    assert "init" in {s.session_id for s in await fresh.list_sessions()}
    with pytest.raises(AuthError):
        await client(agent, agent.token).activity()  # the old token opens nothing


async def test_configure_leaves_what_it_does_not_name(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(config={"env": {"KEEP": "yes"}})
    await client(agent, agent.token).configure({"hostname": "ignored-in-test-mode"})
    result = await client(agent, agent.token).exec(["sh", "-c", "echo $KEEP"])
    assert result.stdout == b"yes\n"


@pytest.mark.parametrize(
    "config",
    [{"env": {"A": 1}}, {"files": [{"path": "relative"}]}, {"hostname": "bad host"}],
)
async def test_a_bad_configuration_is_refused(
    make_agent: Callable[..., Guest], config: dict[str, object]
) -> None:
    agent = make_agent()
    with pytest.raises(RemoteError, match="bad configuration"):
        await client(agent, agent.token).configure(config)
    assert (await client(agent, agent.token).exec(["true"])).exit_code == 0
