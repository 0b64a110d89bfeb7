"""Fixtures of the API tests: one live server per module, a fresh user per test."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kiln.store import Quotas, User

from .cluster_harness import Cluster
from .harness import LiveServer
from .upstream import Upstream


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("server")).start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[Cluster]:
    """Daemons started on demand (``cluster.start(name)``) as nodes of one store."""
    c = Cluster(tmp_path, pg_url)
    try:
        yield c
    finally:
        c.close()


@dataclass
class ApiUser:
    user: User
    key: str
    http: httpx.Client

    def sandbox(self, **body: object) -> dict[str, object]:
        """Create a sandbox (asserting 201) and return it."""
        r = self.http.post("/sandboxes", json=body)
        assert r.status_code == 201, r.text
        data: dict[str, object] = r.json()
        return data

    def exec(self, sandbox: str, *cmd: str, **extra: object) -> dict[str, object]:
        r = self.http.post(f"/sandboxes/{sandbox}/exec", json={"cmd": list(cmd), **extra})
        assert r.status_code == 200, r.text
        data: dict[str, object] = r.json()
        return data


@pytest.fixture
def make_user(server: LiveServer) -> Iterator[Callable[..., ApiUser]]:
    made: list[ApiUser] = []

    def make(quotas: Quotas | None = None) -> ApiUser:
        user, key = server.store.create_user(f"u{secrets.token_hex(4)}", quotas=quotas)
        http = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        api = ApiUser(user, key, http)
        made.append(api)
        return api

    yield make
    for api in made:
        # Free the agent processes of whatever the test left behind.
        r = api.http.get("/sandboxes")
        if r.status_code == 200:
            for sb in r.json():
                api.http.delete(f"/sandboxes/{sb['id']}")
        api.http.close()


@pytest.fixture
def api(make_user: Callable[..., ApiUser]) -> ApiUser:
    return make_user()


@pytest.fixture
def anon(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """A real web service on loopback: inside the sandbox for test-mode agents."""
    service = Upstream().start()
    try:
        yield service
    finally:
        service.stop()
