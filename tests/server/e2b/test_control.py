"""The E2B control plane through the unmodified ``e2b`` SDK (sync), on a real daemon
with real QEMU microVMs: create, list, info, timeouts and expiry, pause and
connect, kill, and what another user or a bad key gets.

What runs inside a sandbox is checked through kiln's own API (exec, background
processes), independently of the SDK's envd side.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from e2b import (
    AuthenticationException,
    ConnectionConfig,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
)

from .conftest import E2B_MARKS, E2bDaemon, kiln_exec, make_sandbox

pytestmark = [*E2B_MARKS, pytest.mark.usefixtures("e2b_env")]

#: A metadata value only this module's sandboxes carry.
SUITE = f"sync-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def pair(e2b_daemon: E2bDaemon) -> Iterator[tuple[Any, Any]]:
    """Two sandboxes of user 1 that tests only look at."""
    a = make_sandbox(
        e2b_daemon,
        envs={"GREETING": "hello e2b", "EMPTY": ""},
        metadata={"suite": SUITE, "role": "a"},
        timeout=900,
    )
    try:
        b = make_sandbox(e2b_daemon, metadata={"suite": SUITE, "role": "b"}, timeout=900)
        try:
            yield a, b
        finally:
            b.kill()
    finally:
        a.kill()


def _near(when: datetime, seconds: float, slack: float = 30) -> bool:
    return abs((when - datetime.now(UTC)).total_seconds() - seconds) < slack


def test_the_sdk_takes_kiln_from_its_environment(e2b_env: E2bDaemon) -> None:
    # The three variables are all a user sets: every call of the SDK then goes to kiln.
    config = ConnectionConfig()
    assert config.api_url == e2b_env.url + "/e2b"
    assert config.api_key == e2b_env.key
    assert config.get_sandbox_url("sb-x", "") == e2b_env.url + "/e2b/envd"


def test_create_with_envs_and_metadata(pair: tuple[Any, Any], kiln_api: httpx.Client) -> None:
    a, _ = pair
    assert a.connection_config.get_sandbox_url(a.sandbox_id, "").endswith("/e2b/envd")
    info = a.get_info()
    assert info.sandbox_id == a.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"suite": SUITE, "role": "a"}
    assert info.state == SandboxState.RUNNING
    assert (info.cpu_count, info.memory_mb) == (1, 512)
    assert info.envd_version == "0.5.7"
    assert abs((info.end_at - info.started_at).total_seconds() - 900) < 5
    assert info.lifecycle == {"on_timeout": "kill", "auto_resume": False}

    # The same sandbox in kiln's own API: metadata are labels, timeout a ttl.
    kiln = kiln_api.get(f"/sandboxes/{a.sandbox_id}").json()
    assert kiln["labels"] == {"suite": SUITE, "role": "a"}
    assert kiln["on_expire"] == "destroy" and kiln["expires_at"] is not None

    # Inside: the env, and E2B's default user and home.
    out = kiln_exec(kiln_api, a.sandbox_id, 'echo "$GREETING|$EMPTY|$(id -un)|$HOME"; ls -d ~')
    assert out == "hello e2b||user|/home/user\n/home/user\n"
    assert kiln_exec(kiln_api, a.sandbox_id, "id -un", user="root") == "root\n"
    # Like kiln's own sandbox user, E2B's has passwordless sudo.
    assert kiln_exec(kiln_api, a.sandbox_id, "sudo -n id -un") == "root\n"


def test_a_kiln_sandbox_keeps_kiln_s_user(e2b_daemon: E2bDaemon, kiln_api: httpx.Client) -> None:
    # Made by kiln's own API, seen through E2B: its default user stays ``sandbox``.
    r = kiln_api.post("/sandboxes", json={"labels": {"suite": "kiln-made"}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        assert kiln_exec(kiln_api, sid, "id -un; echo $HOME") == "sandbox\n/home/sandbox\n"
        info = Sandbox.get_info(sid)
        assert info.template_id == "minimal" and info.state == SandboxState.RUNNING
    finally:
        assert Sandbox.kill(sid) is True


def test_list_filters_by_metadata_and_pages(pair: tuple[Any, Any]) -> None:
    a, b = pair
    everything = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE})).next_items()
    assert {s.sandbox_id for s in everything} == {a.sandbox_id, b.sandbox_id}
    only_a = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE, "role": "a"}))
    assert [s.sandbox_id for s in only_a.next_items()] == [a.sandbox_id]
    assert not only_a.has_next

    pages = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE}), limit=1)
    seen = []
    while pages.has_next:
        items = pages.next_items()
        assert len(items) == 1
        seen += [s.sandbox_id for s in items]
    assert seen == [a.sandbox_id, b.sandbox_id]  # oldest first, each once

    newest_first = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE}), order="desc")
    assert [s.sandbox_id for s in newest_first.next_items()] == [b.sandbox_id, a.sandbox_id]
    paused = Sandbox.list(
        query=SandboxQuery(metadata={"suite": SUITE}, state=[SandboxState.PAUSED])
    )
    assert paused.next_items() == []
    assert not Sandbox.list(query=SandboxQuery(metadata={"suite": "nobody"})).next_items()

    since_b = SandboxQuery(metadata={"suite": SUITE}, started_after=b.get_info().started_at)
    assert [s.sandbox_id for s in Sandbox.list(query=since_b).next_items()] == [b.sandbox_id]
    base = SandboxQuery(metadata={"suite": SUITE}, template="base")
    assert len(Sandbox.list(query=base).next_items()) == 2
    assert not Sandbox.list(query=SandboxQuery(template="minimal-x")).next_items()


def test_connect_to_a_running_sandbox_only_extends_its_timeout(pair: tuple[Any, Any]) -> None:
    _, b = pair
    before = b.get_info().end_at
    same = Sandbox.connect(b.sandbox_id, timeout=10)  # shorter: left alone
    assert same.sandbox_id == b.sandbox_id
    assert b.get_info().end_at == before
    Sandbox.connect(b.sandbox_id, timeout=1800)
    assert _near(b.get_info().end_at, 1800)
    b.set_timeout(900)  # set_timeout may shorten it
    assert _near(b.get_info().end_at, 900)


def test_another_user_neither_sees_nor_touches_a_sandbox(
    pair: tuple[Any, Any], e2b_daemon: E2bDaemon
) -> None:
    a, _ = pair
    other = {"api_key": e2b_daemon.other_key}
    with pytest.raises(NotFoundException):
        Sandbox.get_info(a.sandbox_id, **other)
    with pytest.raises(NotFoundException):
        Sandbox.connect(a.sandbox_id, **other)
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(a.sandbox_id, 5, **other)
    with pytest.raises(NotFoundException):
        Sandbox.pause(a.sandbox_id, **other)
    assert Sandbox.kill(a.sandbox_id, **other) is False
    listed = Sandbox.list(**other).next_items()
    assert a.sandbox_id not in {s.sandbox_id for s in listed}
    assert a.get_info().state == SandboxState.RUNNING  # untouched


def test_a_bad_api_key_is_an_authentication_error() -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="kiln_not-a-key").next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="kiln_not-a-key")


def test_an_unknown_template_is_a_clear_error() -> None:
    with pytest.raises(SandboxException, match="template 'no-such-template' not found") as err:
        Sandbox.create("no-such-template")
    assert err.value.status_code == 404


def test_features_kiln_lacks_are_refused_clearly(pair: tuple[Any, Any]) -> None:
    a, _ = pair
    with pytest.raises(SandboxException, match="fork: not supported") as err:
        a.fork()
    assert err.value.status_code == 400
    with pytest.raises(SandboxException, match="filesystem-only pause"):
        a.pause(mode="filesystem")
    assert a.get_metrics() == []
    assert a.get_info().state == SandboxState.RUNNING


def test_timeout_expiry_kills_the_sandbox() -> None:
    sb = Sandbox.create(timeout=600)
    sb.set_timeout(1)
    deadline = time.monotonic() + 60
    while True:
        try:
            sb.get_info()
        except NotFoundException:
            break
        assert time.monotonic() < deadline, "the sandbox outlived its timeout"
        time.sleep(0.5)
    assert sb.kill() is False


def _wait_state(sb: Any, state: SandboxState) -> None:
    deadline = time.monotonic() + 60
    while sb.get_info().state != state:
        assert time.monotonic() < deadline, f"never became {state}"
        time.sleep(0.5)


def test_pause_and_connect_keep_memory_and_kill_twice(kiln_api: httpx.Client) -> None:
    sb = Sandbox.create(timeout=600, lifecycle={"on_timeout": "pause"})
    sid = sb.sandbox_id
    try:
        assert sb.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        kiln_exec(kiln_api, sid, "echo in-memory > /dev/shm/mark")
        started = kiln_api.post(f"/sandboxes/{sid}/processes", json={"cmd": ["sleep", "3600"]})
        assert started.status_code == 201, started.text
        pid = started.json()["pid"]

        # Its timeout pauses it (autoPause) instead of killing it...
        sb.set_timeout(1)
        _wait_state(sb, SandboxState.PAUSED)
        assert kiln_api.get(f"/sandboxes/{sid}").json()["status"] == "stopped"
        assert sb.get_info().end_at > datetime.now(UTC) + timedelta(days=365)
        # ... and a connect resumes it as it was, with a new timeout.
        again = Sandbox.connect(sid, timeout=120)
        assert again.sandbox_id == sid
        info = sb.get_info()
        assert info.state == SandboxState.RUNNING and _near(info.end_at, 120)
        assert kiln_exec(kiln_api, sid, "cat /dev/shm/mark") == "in-memory\n"
        assert kiln_api.get(f"/sandboxes/{sid}/processes/{pid}").json()["running"] is True

        # An explicit pause: True, then False while paused; connect restores again.
        assert sb.pause() is True
        assert sb.pause() is False
        assert Sandbox.get_info(sid).state == SandboxState.PAUSED
        assert [
            s.sandbox_id
            for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        ] == [sid]
        sb.connect()
        assert kiln_exec(kiln_api, sid, "cat /dev/shm/mark") == "in-memory\n"
        assert kiln_api.get(f"/sandboxes/{sid}/processes/{pid}").json()["running"] is True
    finally:
        assert sb.kill() is True
    assert sb.kill() is False
    assert Sandbox.kill(sid) is False
    with pytest.raises(NotFoundException):
        Sandbox.connect(sid)
