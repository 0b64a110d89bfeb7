"""The envd router on a live daemon (fake engine, real agents): sandbox by header,
token, user, health; and the error codes the SDK maps to its exceptions."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from ..conftest import ApiUser
from ..harness import LiveServer

LIST = "/e2b/envd/process.Process/List"


@pytest.fixture
def sandbox(api: ApiUser, server: LiveServer) -> dict[str, Any]:
    sb = api.sandbox(name="envd-box")
    return {**sb, "token": server.services.envd_tokens.issue(str(sb["id"]))}


def headers(sb: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sb["id"], "X-Access-Token": sb["token"], **extra}


def test_list_by_id_and_by_name(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    r = anon.post(LIST, json={}, headers=headers(sandbox))
    assert r.status_code == 200, r.text
    assert r.json() == {"processes": []}
    r = anon.post(LIST, json={}, headers=headers(sandbox, **{"E2b-Sandbox-Id": "envd-box"}))
    assert r.status_code == 200, r.text


def test_bad_token(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    for token in ("nope", ""):
        r = anon.post(LIST, json={}, headers=headers(sandbox, **{"X-Access-Token": token}))
        assert r.status_code == 401
        assert r.json()["code"] == "unauthenticated"
    r = anon.post(LIST, json={}, headers={"E2b-Sandbox-Id": sandbox["id"]})
    assert r.status_code == 401


def test_token_of_another_sandbox(
    anon: httpx.Client,
    sandbox: dict[str, Any],
    make_user: Callable[..., ApiUser],
    server: LiveServer,
) -> None:
    other = make_user().sandbox(name="envd-box")  # same name, another user
    token = server.services.envd_tokens.issue(str(other["id"]))
    r = anon.post(LIST, json={}, headers=headers(sandbox, **{"X-Access-Token": token}))
    assert r.status_code == 401
    # By name, the token picks which of the two sandboxes called so is meant.
    r = anon.post(LIST, json={}, headers={"E2b-Sandbox-Id": "envd-box", "X-Access-Token": token})
    assert r.status_code == 200


def test_unknown_sandbox_is_not_running(anon: httpx.Client) -> None:
    r = anon.post(
        LIST, json={}, headers={"E2b-Sandbox-Id": "sb-000000000000", "X-Access-Token": "x"}
    )
    assert r.status_code == 503
    assert r.json()["code"] == "unavailable"
    assert "was not found" in r.json()["message"]  # the SDK: SandboxNotRunningException
    r = anon.post(LIST, json={})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_argument"


def test_users(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    def basic(user: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:".encode()).decode()

    for user in ("user", "root", "sandbox"):
        r = anon.post(LIST, json={}, headers=headers(sandbox, Authorization=basic(user)))
        assert r.status_code == 200, (user, r.text)
    r = anon.post(LIST, json={}, headers=headers(sandbox, Authorization=basic("mallory")))
    assert r.status_code == 400
    assert "mallory" in r.json()["message"]
    r = anon.post(LIST, json={}, headers=headers(sandbox, Authorization="Bearer x"))
    assert r.status_code == 401


def test_health(anon: httpx.Client, sandbox: dict[str, Any], api: ApiUser) -> None:
    r = anon.get("/e2b/envd/health", headers={"E2b-Sandbox-Id": sandbox["id"]})
    assert r.status_code == 204
    api.http.delete(f"/sandboxes/{sandbox['id']}")
    r = anon.get("/e2b/envd/health", headers={"E2b-Sandbox-Id": sandbox["id"]})
    assert r.status_code == 502
    assert "was not found" in r.json()["message"]


def test_kiln_routes_are_untouched(api: ApiUser) -> None:
    r = api.http.post("/sandboxes", content=b"{bad", headers={"content-type": "text/plain"})
    assert r.status_code == 400  # still read as JSON by the body limit


def test_stream_errors_come_in_the_end_message(anon: httpx.Client) -> None:
    body = json.dumps({"process": {"pid": 1}}).encode()
    r = anon.post(
        "/e2b/envd/process.Process/Connect",
        content=struct.pack(">BI", 0, len(body)) + body,
        headers={"content-type": "application/connect+json", "E2b-Sandbox-Id": "nope"},
    )
    assert r.status_code == 200
    end = json.loads(r.content[5:])
    assert r.content[0] == 2
    assert end["error"]["code"] == "unavailable"
