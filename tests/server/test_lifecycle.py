"""Labels and expiry through the API (real HTTP, real SQLite, real agents), and the
expiry decision and its actions with an injected clock."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from types import SimpleNamespace
from typing import cast

import pytest

from fakes.clock import ManualClock
from kiln.engine import Status, Thermal
from kiln.server.expiry import Destroy, Disarm, ExpiryReaper, Stop, decide
from kiln.server.services import SandboxService
from kiln.store import OnExpire, SandboxConfig
from kiln.store import Sandbox as SandboxRow

from .conftest import ApiUser
from .harness import LiveServer


def _expires_in(sb: dict[str, object]) -> float:
    return datetime.fromisoformat(str(sb["expires_at"])).timestamp() - time.time()


# --- the API ------------------------------------------------------------------------------


def test_create_with_labels_and_ttl(api: ApiUser) -> None:
    sb = api.sandbox(name="lab", labels={"team": "ml", "run": "42"}, ttl_s=3600)
    assert sb["labels"] == {"team": "ml", "run": "42"}
    assert 3590 < _expires_in(sb) <= 3600
    assert sb["on_expire"] == "destroy"
    assert api.http.get("/sandboxes/lab").json()["labels"] == {"team": "ml", "run": "42"}

    plain = api.sandbox(name="plain")
    assert (plain["labels"], plain["expires_at"], plain["on_expire"]) == ({}, None, "destroy")
    fractional = api.sandbox(ttl_s=90.5, on_expire="stop")
    assert fractional["on_expire"] == "stop" and 80 < _expires_in(fractional) <= 90.5


def test_patch_replaces_labels_and_restarts_or_removes_the_ttl(api: ApiUser) -> None:
    api.sandbox(name="p", labels={"a": "1", "b": "2"}, ttl_s=60)
    r = api.http.patch("/sandboxes/p", json={"labels": {"c": "3"}})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == {"c": "3"}
    assert 50 < _expires_in(r.json()) <= 60  # untouched

    r = api.http.patch("/sandboxes/p", json={"ttl_s": 7200})
    assert 7190 < _expires_in(r.json()) <= 7200  # counted again from now
    assert r.json()["labels"] == {"c": "3"}

    r = api.http.patch("/sandboxes/p", json={"ttl_s": None, "on_expire": "stop"})
    assert (r.json()["expires_at"], r.json()["on_expire"]) == (None, "stop")
    r = api.http.patch("/sandboxes/p", json={"labels": {}, "name": "q"})
    assert (r.json()["labels"], r.json()["name"]) == ({}, "q")
    assert api.http.get("/sandboxes/q").json()["expires_at"] is None


def test_list_filters_on_labels(api: ApiUser) -> None:
    api.sandbox(name="a", labels={"team": "ml", "env": "dev"})
    api.sandbox(name="b", labels={"team": "ml", "env": "prod"})
    api.sandbox(name="c", labels={"team": "web", "note": "x=y"})

    def names(*filters: str) -> list[str]:
        r = api.http.get("/sandboxes", params=[("label", f) for f in filters])
        assert r.status_code == 200, r.text
        return [s["name"] for s in r.json()]

    assert names() == ["a", "b", "c"]
    assert names("team=ml") == ["a", "b"]
    assert names("team=ml", "env=prod") == ["b"]
    assert names("note=x=y") == ["c"]  # split at the first '='
    assert names("team=ml", "team=web") == []  # all must match
    assert names("team=nobody") == []


@pytest.mark.parametrize("bad", ["team", "=ml", ""])
def test_a_malformed_label_filter_is_400(api: ApiUser, bad: str) -> None:
    r = api.http.get("/sandboxes", params={"label": bad})
    assert r.status_code == 400
    assert "KEY=VALUE" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"labels": ["team=ml"]}, "labels"),
        ({"labels": {"team": 1}}, "labels"),
        ({"labels": "team=ml"}, "labels"),
        ({"labels": {"": "x"}}, "labels"),
        ({"labels": {"a=b": "x"}}, "labels"),
        ({"labels": {"k" * 200: "x"}}, "labels"),
        ({"ttl_s": -5}, "ttl_s"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": "1h"}, "ttl_s"),
        ({"ttl_s": True}, "ttl_s"),
        ({"ttl_s": 1e12}, "ttl_s"),
        ({"on_expire": "explode"}, "on_expire"),
    ],
)
def test_bad_lifecycle_fields_are_422_naming_the_field(
    api: ApiUser, body: dict[str, object], field: str
) -> None:
    r = api.http.post("/sandboxes", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]
    api.sandbox(name="target")
    r = api.http.patch("/sandboxes/target", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]
    assert api.http.get("/sandboxes").json()[0]["labels"] == {}  # nothing half-applied


# --- the decision, with an injected clock -------------------------------------------------


def _row(
    sid: str,
    expires_at: float | None,
    on_expire: OnExpire = OnExpire.DESTROY,
    status: Status = Status.RUNNING,
) -> SandboxRow:
    return SandboxRow(
        id=sid,
        user_id="u",
        name=sid,
        cpus=1,
        memory_mb=512,
        image="minimal",
        keep_hot=False,
        status=status,
        thermal=Thermal.HOT,
        ip=None,
        engine="fake",
        engine_state=None,
        config=SandboxConfig(),
        created_at=0.0,
        last_active_at=0.0,
        expires_at=expires_at,
        on_expire=on_expire,
    )


def test_decide_acts_on_what_is_due_and_nothing_else() -> None:
    rows = [
        _row("later", 200.0),
        _row("never", None),
        _row("stop-me", 99.0, OnExpire.STOP),
        _row("kill-me", 100.0),  # exactly now: due
        _row("stopped", 50.0, OnExpire.STOP, Status.STOPPED),
        _row("broken", 60.0, OnExpire.STOP, Status.ERROR),
        _row("broken-kill", 70.0, OnExpire.DESTROY, Status.ERROR),
        _row("creating", 10.0),
    ]
    assert decide(100.0, rows, busy={"creating"}) == [
        Disarm("stopped"),
        Disarm("broken"),
        Destroy("broken-kill"),
        Stop("stop-me"),
        Destroy("kill-me"),
    ]
    assert decide(99.9, [_row("x", 100.0)]) == []
    assert decide(1e9, []) == []


def test_the_reaper_destroys_stops_and_leaves_alone_by_the_clock(
    api: ApiUser, server: LiveServer
) -> None:
    """The acting half, on the real store and agents: only the clock is the test's."""
    doomed = api.sandbox(name="doomed", ttl_s=10)
    sleeper = api.sandbox(name="sleeper", ttl_s=20, on_expire="stop")
    keeper = api.sandbox(name="keeper", ttl_s=3600, labels={"keep": "me"})
    clock = ManualClock(start=time.time())
    reaper = ExpiryReaper(server.services.sandboxes, clock=clock)

    async def tick() -> list[object]:
        return list(await reaper.tick())

    assert server.call(tick) == []
    clock.advance(15)
    assert server.call(tick) == [Destroy(str(doomed["id"]))]
    assert api.http.get("/sandboxes/doomed").status_code == 404
    assert str(doomed["id"]) not in server.engine.boxes

    # A PATCH that moves the expiry wins over a decision already taken.
    clock.advance(10)
    api.http.patch("/sandboxes/sleeper", json={"ttl_s": 3600})
    assert server.call(tick) == []
    api.http.patch("/sandboxes/sleeper", json={"ttl_s": 1})
    clock.advance(2)
    assert server.call(tick) == [Stop(str(sleeper["id"]))]
    after = api.http.get("/sandboxes/sleeper").json()
    assert (after["status"], after["expires_at"]) == ("stopped", None)  # listed, disarmed
    assert server.call(tick) == []
    assert api.http.get("/sandboxes/keeper").json()["id"] == keeper["id"]


def test_a_failed_expiry_is_retried_later_not_every_tick(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="stubborn", ttl_s=1)
    sid = str(sb["id"])
    clock = ManualClock(start=time.time() + 5)
    reaper = ExpiryReaper(server.services.sandboxes, clock=clock, retry_s=30)
    server.engine.fail("destroy", sid)
    try:

        async def tick() -> list[object]:
            return list(await reaper.tick())

        assert server.call(tick) == []
        destroys = server.engine.called("destroy").count(sid)
        clock.advance(10)
        assert server.call(tick) == []
        assert server.engine.called("destroy").count(sid) == destroys  # waiting to retry
        server.engine.heal("destroy", sid)
        clock.advance(25)
        assert server.call(tick) == [Destroy(sid)]
    finally:
        server.engine.heal("destroy", sid)
    assert api.http.get(f"/sandboxes/{sid}").status_code == 404


async def test_stop_ends_the_loop_without_waiting_for_a_tick() -> None:
    nothing = SimpleNamespace(creating=frozenset(), store=SimpleNamespace(list_expiring=list))
    reaper = ExpiryReaper(cast(SandboxService, nothing), tick_s=3600)
    task = asyncio.create_task(reaper.run())
    await asyncio.sleep(0.05)
    reaper.stop()
    async with asyncio.timeout(2):
        await task
