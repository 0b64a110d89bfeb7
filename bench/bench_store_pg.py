"""The store on PostgreSQL against SQLite, measured in the same run: store calls, then
the HTTP API's list and get on each.

    .venv/bin/python -m bench store_pg

PostgreSQL is a throwaway local server (``kiln.testing.postgres``: Debian's
``postgresql``, on 127.0.0.1, ``fsync`` off), so the PostgreSQL rows are the
loopback round trips and the server's work, not a disk or a network: a real
deployment adds its network's round-trip time to each statement. SQLite (a
real file, WAL) is the reference row of each pair.

The API part runs the tests' in-process daemon (``tests/server/harness.py``: real
uvicorn + FastAPI + services over each store, the fake engine with lazy test-mode
agents) with the same sandboxes on each store.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from kiln.store import SandboxConfig, SecretBox, Store

from ._harness import agent_skip_reason
from ._stats import Row, print_table

REQUIRES: str | None = "PostgreSQL server binaries (scripts/bootstrap installs postgresql)"

ROOT = Path(__file__).resolve().parent.parent
N = 500
WARMUP = 20
LIVE = 100  # one user's live sandboxes while measuring store calls
API_SANDBOXES = 50  # sandboxes listed by GET /sandboxes


def skip_reason() -> str | None:
    from kiln.testing.postgres import PostgresNotInstalled, find_bindir  # noqa: PLC0415

    try:
        find_bindir()
    except PostgresNotInstalled as exc:
        return str(exc)
    return agent_skip_reason()


def _measure(fn: Callable[[int], object], n: int = N) -> list[float]:
    for i in range(WARMUP):
        fn(i)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def _store_rows(store: Store, label: str) -> list[tuple[str, Row]]:
    user, key = store.create_user("bench")
    ids = [
        store.create_sandbox(
            user.id, image="m", engine="qemu", enforce_quota=False, engine_state={"i": i}
        ).id
        for i in range(LIVE)
    ]
    config = SandboxConfig(env={"A": "1"})
    calls: list[tuple[str, Callable[[int], object], int]] = [
        ("user_by_key (auth)", lambda i: store.user_by_key(key), N),
        ("get_sandbox", lambda i: store.get_sandbox(ids[i % LIVE]), N),
        ("find_sandbox (by id)", lambda i: store.find_sandbox(user.id, ids[i % LIVE]), N),
        (f"list_sandboxes ({LIVE} rows)", lambda i: store.list_sandboxes(user.id), 100),
        ("touch", lambda i: store.touch(ids[i % LIVE], 2e9 + i), N),
        (
            "set_engine_state",
            lambda i: store.set_engine_state(ids[i % LIVE], {"i": i, "s": "x"}),
            N,
        ),
        (
            "create_sandbox (quota checked)",
            lambda i: store.create_sandbox(user.id, image="m", engine="qemu", config=config),
            N,
        ),
    ]
    return [(name, Row(f"{name}: {label}", _measure(fn, n))) for name, fn, n in calls]


@contextmanager
def _stores() -> Iterator[tuple[Store, Store]]:
    from kiln.testing.postgres import PostgresServer  # noqa: PLC0415

    with (
        tempfile.TemporaryDirectory() as tmp,
        PostgresServer.start() as pg,
    ):
        box = SecretBox(Path(tmp) / "secret.key")
        with (
            Store.open(Path(tmp) / "kiln.db", secret_box=box) as lite,
            Store.open(pg.create_database(), secret_box=box) as post,
        ):
            yield lite, post


def _api_rows(target: str | None, label: str) -> list[tuple[str, Row]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from server.harness import LiveServer  # noqa: PLC0415 - the test harness, on demand

    with tempfile.TemporaryDirectory() as tmp:
        live = LiveServer(Path(tmp), lazy_agents=True, store_target=target).start()
        try:
            _user, key = live.store.create_user("bench")
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=live.url, headers=headers, timeout=30) as c:
                names = []
                for i in range(API_SANDBOXES):
                    r = c.post("/sandboxes", json={"name": f"sb{i}"})
                    r.raise_for_status()
                    names.append(r.json()["name"])

                def get(i: int) -> None:
                    c.get(f"/sandboxes/{names[i % API_SANDBOXES]}").raise_for_status()

                def listing(i: int) -> None:
                    c.get("/sandboxes").raise_for_status()

                return [
                    (
                        "GET /sandboxes/{name}",
                        Row(f"GET /sandboxes/{{name}}: {label}", _measure(get)),
                    ),
                    (
                        f"GET /sandboxes ({API_SANDBOXES})",
                        Row(f"GET /sandboxes ({API_SANDBOXES}): {label}", _measure(listing, 200)),
                    ),
                ]
        finally:
            live.stop()


def _paired(reference: list[tuple[str, Row]], other: list[tuple[str, Row]]) -> list[Row]:
    rows = []
    for (_name, ref), (_same, row) in zip(reference, other, strict=True):
        rows += [Row(ref.name, ref.samples_ms, "reference"), row]
    return rows


def main() -> None:
    from kiln.testing.postgres import PostgresServer  # noqa: PLC0415

    with _stores() as (lite, post):
        lite_rows = _store_rows(lite, "sqlite")
        pg_rows = _store_rows(post, "postgresql")
    print_table("store calls: SQLite (reference) vs PostgreSQL", _paired(lite_rows, pg_rows))

    with PostgresServer.start() as pg:
        lite_api = _api_rows(None, "sqlite")
        pg_api = _api_rows(pg.create_database(), "postgresql")
    print_table(
        "HTTP API on each store: SQLite (reference) vs PostgreSQL", _paired(lite_api, pg_api)
    )


if __name__ == "__main__":
    main()
