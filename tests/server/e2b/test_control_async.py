"""The E2B control plane through the SDK's ``AsyncSandbox``, on a real daemon with a real
QEMU microVM: one sandbox through create, info, list, timeout, pause, connect and
kill, and what another user or a bad key gets."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    NotFoundException,
    SandboxException,
    SandboxQuery,
    SandboxState,
)

from .conftest import E2B_MARKS, E2bDaemon, kiln_exec

pytestmark = [*E2B_MARKS, pytest.mark.usefixtures("e2b_env")]


def _seconds_left(when: datetime) -> float:
    return (when - datetime.now(UTC)).total_seconds()


async def test_an_async_sandbox_s_lifecycle(e2b_daemon: E2bDaemon, kiln_api: httpx.Client) -> None:
    tag = f"async-{secrets.token_hex(3)}"
    create = {"envs": {"WHO": "async"}, "metadata": {"suite": tag}, "timeout": 600}
    sb = await AsyncSandbox.create(**create, idempotency_key=tag)
    sid = sb.sandbox_id
    try:
        # A retry with the same key gets the same sandbox, not a second one.
        assert (await AsyncSandbox.create(**create, idempotency_key=tag)).sandbox_id == sid
        info = await sb.get_info()
        assert (info.template_id, info.metadata, info.state) == (
            "base",
            {"suite": tag},
            SandboxState.RUNNING,
        )
        assert abs((info.end_at - info.started_at).total_seconds() - 600) < 5
        assert kiln_exec(kiln_api, sid, 'echo "$WHO $(id -un) $HOME"') == "async user /home/user\n"

        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [sid]

        await sb.set_timeout(1200)
        assert 1150 < _seconds_left((await sb.get_info()).end_at) <= 1200

        other = {"api_key": e2b_daemon.other_key}
        with pytest.raises(NotFoundException):
            await AsyncSandbox.get_info(sid, **other)
        assert await AsyncSandbox.kill(sid, **other) is False
        with pytest.raises(AuthenticationException):
            await AsyncSandbox.get_info(sid, api_key="kiln_wrong")

        kiln_exec(kiln_api, sid, "echo kept > /dev/shm/mark")
        assert await sb.pause() is True
        assert await sb.pause() is False
        assert (await AsyncSandbox.get_info(sid)).state == SandboxState.PAUSED
        again = await AsyncSandbox.connect(sid)
        assert again.sandbox_id == sid
        assert (await again.get_info()).state == SandboxState.RUNNING
        assert kiln_exec(kiln_api, sid, "cat /dev/shm/mark") == "kept\n"
        with pytest.raises(SandboxException, match="template 'nope' not found"):
            await AsyncSandbox.create("nope")
    finally:
        assert await sb.kill() is True
    assert await sb.kill() is False
    with pytest.raises(NotFoundException):
        await AsyncSandbox.get_info(sid)
