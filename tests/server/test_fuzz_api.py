"""schemathesis against the live API: no generated request may get a 5xx.

The server is the real app under uvicorn on loopback over a real SQLite store
(:class:`~.harness.LiveServer`), driven with the OpenAPI schema it serves at
``/openapi.json``, as a user with a valid API key (past authentication). Every
operation gets the same fixed budget of cases (schemathesis's examples, edge
cases and ``EXAMPLES`` generated ones, valid and invalid), ``derandomize``-d:
the same requests on every run, ~35 s for the module on 2 cores.

Two runs, because test-mode agents run commands and write files on this host
as root, and random commands and paths must never reach one:

* every operation, as a user whose quota allows no sandbox (over the agent
  engine of the API tests, which therefore never starts an agent): creates
  are validated up to the quota, routes under ``/sandboxes/{sandbox}`` answer
  404, templates, secrets and volumes run all the way to the store;
* every operation that needs no agent, aimed at a sandbox that exists, over a
  fake engine of states only: create, edit, stop, start, publish, destroy.

Not fuzzed: what exec, processes, files, sessions and ports do once they reach
an agent (the agent protocol has its own fuzzing, tests/protocol/test_fuzz.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from fakes.engine import FakeEngine
from kiln.config import Config, ThermalSettings
from kiln.server import Services, create_app
from kiln.store import Quotas, Store

from .harness import LiveServer

#: Cases per operation (there are ~36): the whole module runs in well under a minute.
EXAMPLES = 25
#: The same cases every run, within the budget, whatever the host's speed.
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _served_schema() -> dict[str, Any]:
    """The document the app serves at /openapi.json (it depends on no state: an app
    over an in-memory store gives the same; the live server's is checked below)."""
    with Store.open(Path(":memory:")) as store:
        config = Config(data_dir=Path("/nonexistent"), thermal=ThermalSettings())
        doc: dict[str, Any] = create_app(
            Services(store=store, engine=FakeEngine(), config=config)
        ).openapi()
        return doc


SCHEMA = _served_schema()
schema = schemathesis.openapi.from_dict(SCHEMA)
cases: Counter[str] = Counter()
server_errors: list[str] = []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    live = LiveServer(tmp_path_factory.mktemp("fuzz"), lazy_agents=True).start()
    try:
        _user, key = live.store.create_user("fuzz", quotas=Quotas(max_sandboxes=0))
        yield live, key
        # Every operation of the schema was exercised, and how much is reported.
        on_sandbox = {c: n for c, n in cases.items() if c.startswith("sandbox ")}
        print(
            f"\nschemathesis: {sum(cases.values())} cases, {len(cases) - len(on_sandbox)}"
            f" operations without a sandbox and {len(on_sandbox)} on one;"
            f" {len(server_errors)} answered 5xx {server_errors}"
        )
    finally:
        live.stop()


@pytest.fixture(scope="module")
def http(fuzz_server: tuple[LiveServer, str]) -> Iterator[Any]:
    import requests  # noqa: PLC0415 -- schemathesis's own transport

    with requests.Session() as session:
        yield session


@schema.parametrize()
@FUZZ
def test_no_request_gets_a_server_error(
    case: Any, fuzz_server: tuple[LiveServer, str], http: Any
) -> None:
    live, key = fuzz_server
    # The generated Authorization header (if any) is replaced: past auth, always.
    response = case.call(
        base_url=live.url, session=http, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    cases[case.operation.label] += 1
    if response.status_code >= 500:
        server_errors.append(f"{case.operation.label}: {response.status_code}")
    assert response.status_code < 500, (
        f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
    )


#: Routes that talk to the sandbox's agent: the engine below has none.
AGENT_ROUTES = r"^/sandboxes/\{sandbox\}/(exec|processes|files|sessions|ports)"
lifecycle = schema.exclude(path_regex=AGENT_ROUTES)
SANDBOX = "fz"


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    """A fake engine of states only (no agent, nothing runs): sandboxes are created,
    stopped, started, edited, published and destroyed for real in the store."""
    root = tmp_path_factory.mktemp("fuzz-lifecycle")
    live = LiveServer(root, engine_factory=lambda _data: FakeEngine()).start()
    try:
        _user, key = live.store.create_user("fuzz", quotas=Quotas(max_sandboxes=3))
        yield live, key
    finally:
        live.stop()


@lifecycle.parametrize()
@FUZZ
def test_no_request_on_a_real_sandbox_gets_a_server_error(
    case: Any, lifecycle_server: tuple[LiveServer, str], http: Any
) -> None:
    live, key = lifecycle_server
    auth = {"Authorization": f"Bearer {key}"}
    if "sandbox" in (case.path_parameters or {}):
        # Aim at a sandbox that exists (a case before may have destroyed it).
        if http.get(f"{live.url}/sandboxes/{SANDBOX}", headers=auth).status_code == 404:
            http.post(f"{live.url}/sandboxes", json={"name": SANDBOX}, headers=auth)
        case.path_parameters["sandbox"] = SANDBOX
    response = case.call(base_url=live.url, session=http, headers=auth, timeout=30)
    cases["sandbox " + case.operation.label] += 1
    if response.status_code >= 500:
        server_errors.append(f"{case.operation.label}: {response.status_code}")
    assert response.status_code < 500, (
        f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
    )


def test_the_fuzzed_schema_is_the_one_the_server_serves(
    fuzz_server: tuple[LiveServer, str],
) -> None:
    live, _key = fuzz_server
    assert httpx.get(f"{live.url}/openapi.json").json() == SCHEMA


def test_every_operation_was_fuzzed(fuzz_server: tuple[LiveServer, str]) -> None:
    # After the parametrized test (pytest keeps the order of a module's tests).
    operations = {f"{m.upper()} {p}" for p, ops in SCHEMA["paths"].items() for m in ops}
    assert {c for c in cases if not c.startswith("sandbox ")} == operations
    assert min(cases.values()) >= 1


def test_the_fuzz_user_cannot_start_an_agent(fuzz_server: tuple[LiveServer, str]) -> None:
    live, key = fuzz_server
    r = httpx.post(
        f"{live.url}/sandboxes", json={"name": "x"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 403 and not (Path(live.root) / "engine" / "agents.pids").exists()
