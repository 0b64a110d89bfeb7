"""The WebSocket shell: auth (query token, bearer header, refusal), I/O, resize, detach."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import ApiUser
from .harness import LiveServer


def ws_url(server: LiveServer, sandbox: str, **params: object) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{server.ws_url}/sandboxes/{sandbox}/ws" + (f"?{query}" if query else "")


async def read_until(ws: ClientConnection, needle: bytes, within: float = 10) -> bytes:
    seen = b""
    async with asyncio.timeout(within):
        while needle not in seen:
            message = await ws.recv()
            assert isinstance(message, bytes), f"a text frame: {message!r}"
            seen += message
    return seen


async def test_query_token(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="sh1")
    url = ws_url(server, "sh1", token=api.key, cmd="/bin/sh")
    async with connect(url) as ws:
        await ws.send(b"echo hello-$((6*7))\n")
        assert b"hello-42" in await read_until(ws, b"hello-42")


async def test_bearer_header(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="sh2")
    url = ws_url(server, "sh2", cmd="/bin/sh")
    async with connect(url, additional_headers={"Authorization": f"Bearer {api.key}"}) as ws:
        await ws.send(b"echo via-header\n")
        await read_until(ws, b"via-header")


@pytest.mark.parametrize(
    ("token", "headers"),
    [
        (None, None),
        ("kiln_wrong", None),
        (None, {"Authorization": "Bearer kiln_wrong"}),
        (None, {"Authorization": "Basic abc"}),
    ],
)
async def test_refused_without_a_valid_key(
    api: ApiUser, server: LiveServer, token: str | None, headers: dict[str, str] | None
) -> None:
    api.sandbox(name="locked")
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(server, "locked", token=token), additional_headers=headers):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert "error" in json.loads(response.body or b"{}")


async def test_refused_for_someone_elses_or_unknown_sandbox(
    make_user: Callable[..., ApiUser], server: LiveServer
) -> None:
    owner, other = make_user(), make_user()
    owner.sandbox(name="private")
    for name in ("private", "nonexistent"):
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(server, name, token=other.key)):
                pass
        assert info.value.response.status_code == 404


async def test_bad_parameters_are_400(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="params")
    for params in ({"rows": "abc"}, {"cols": "0"}, {"session_id": "s1", "cmd": "sh"}):
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(server, "params", token=api.key, **params)):
                pass
        assert info.value.response.status_code == 400, params


async def test_unknown_session_is_404(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="nosession")
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(server, "nosession", token=api.key, session_id="s999")):
            pass
    assert info.value.response.status_code == 404


async def test_resize_and_initial_size(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="sized")
    url = ws_url(server, "sized", token=api.key, cmd="/bin/sh", rows=30, cols=100)
    async with connect(url) as ws:
        await ws.send(b"stty size\n")
        await read_until(ws, b"30 100")
        await ws.send(json.dumps({"type": "resize", "rows": 50, "cols": 132}))
        await asyncio.sleep(0.2)
        await ws.send(b"stty size\n")
        await read_until(ws, b"50 132")


async def test_close_detaches_and_reattach_replays(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="persist")
    url = ws_url(server, "persist", token=api.key, cmd="/bin/sh")
    async with connect(url) as ws:
        session_id = ws.response.headers["X-Kiln-Session-Id"]
        await ws.send(b"export MARK=kept; echo first-$MARK\n")
        await read_until(ws, b"first-kept")
    # Closed: the session keeps running.
    sessions = api.http.get("/sandboxes/persist/sessions").json()
    mine = [s for s in sessions if s["session_id"] == session_id]
    assert mine and mine[0]["running"] is True and mine[0]["tty"] is True

    async with connect(ws_url(server, "persist", token=api.key, session_id=session_id)) as ws:
        assert ws.response.headers["X-Kiln-Session-Id"] == session_id
        replay = await read_until(ws, b"first-kept")  # the scrollback
        assert b"first-kept" in replay
        await ws.send(b"echo second-$MARK\n")
        await read_until(ws, b"second-kept")


async def test_exit_closes_the_socket_with_the_code(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="quitter")
    async with connect(ws_url(server, "quitter", token=api.key, cmd="/bin/sh")) as ws:
        await ws.send(b"exit 7\n")
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1000
    assert info.value.rcvd.reason == "exit 7"


async def test_text_input_and_kill_by_api(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="typed")
    async with connect(ws_url(server, "typed", token=api.key, cmd="/bin/sh")) as ws:
        session_id = ws.response.headers["X-Kiln-Session-Id"]
        await ws.send("echo typed-as-text\n")  # a text frame that is not a control message
        await read_until(ws, b"typed-as-text")
        r = api.http.delete(f"/sandboxes/typed/sessions/{session_id}")
        assert r.status_code == 204
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
    sessions = api.http.get("/sandboxes/typed/sessions").json()
    assert not any(s["session_id"] == session_id and s["running"] for s in sessions)
    assert api.http.delete("/sandboxes/typed/sessions/s404").status_code == 404


async def test_init_script_runs_as_session_init(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="booted", init="echo from-init; sleep 60")
    sessions = api.http.get("/sandboxes/booted/sessions").json()
    assert any(s["session_id"] == "init" for s in sessions)
    async with connect(ws_url(server, "booted", token=api.key, session_id="init")) as ws:
        await read_until(ws, b"from-init")


async def test_user_root_for_a_new_session(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="rooted")
    url = ws_url(server, "rooted", token=api.key, cmd="/bin/sh", user="root")
    async with connect(url) as ws:
        await ws.send(b"echo uid-$(id -u)-\n")
        expected = b"uid-0-" if os.geteuid() == 0 else b"not root"
        await read_until(ws, expected)
    # The sandbox user by name is the default user (in test mode: whoever runs the agent).
    url = ws_url(server, "rooted", token=api.key, cmd="/bin/sh", user="sandbox")
    async with connect(url) as ws:
        await ws.send(b"echo uid-$(id -u)-\n")
        await read_until(ws, f"uid-{os.geteuid()}-".encode())


async def test_bad_user_is_refused_before_the_upgrade(api: ApiUser, server: LiveServer) -> None:
    api.sandbox(name="whoever")
    for params in ({"user": "nobody"}, {"user": "0"}, {"session_id": "s1", "user": "root"}):
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(server, "whoever", token=api.key, **params)):
                pass
        response = info.value.response
        assert response.status_code == 400, params
        error = json.loads(response.body or b"{}")["error"]
        assert "user" in error, error
        if params.get("session_id") is None:
            assert "'root' or 'sandbox'" in error, error
    sessions = api.http.get("/sandboxes/whoever/sessions").json()
    assert sessions == []  # nothing was started for a refused request
