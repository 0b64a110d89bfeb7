"""What only the PostgreSQL store has to get right: several stores (daemons) writing to
one database at once, migrations racing, and a server that goes away and comes back.

Every test runs against a real PostgreSQL server (``postgres_server``), with each
:class:`Store` on its own connection, as two daemons on two hosts would be.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from kiln.store import (
    LATEST_VERSION,
    NameTaken,
    NewVolume,
    QuotaExceeded,
    Quotas,
    Sandbox,
    SandboxConfig,
    SchemaError,
    SecretBox,
    Store,
    StoreError,
    StoreUnavailable,
    VolumeInUse,
    VolumeMount,
)
from kiln.store.postgres_backend import GLOBAL_LOCK, RECONNECT_BACKOFF_S, redact
from kiln.testing.postgres import PostgresServer

STORES = 2
THREADS_PER_STORE = 4


@pytest.fixture
def stores(pg_url: str, tmp_path: Path) -> Iterator[list[Store]]:
    """Two stores on one database, as two daemons would open it."""
    box = SecretBox(tmp_path / "secret.key")
    opened = [Store.open(pg_url, secret_box=box) for _ in range(STORES)]
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def _race(stores: list[Store], attempts: int, call: Callable[[Store, int], object]) -> list[object]:
    """Run ``call`` ``attempts`` times spread over every store's threads, all released
    at once; return each result or the exception it raised."""
    start = threading.Barrier(min(attempts, STORES * THREADS_PER_STORE))

    def one(i: int) -> object:
        if i < start.parties:
            start.wait()
        try:
            return call(stores[i % len(stores)], i)
        except StoreError as exc:
            return exc

    with ThreadPoolExecutor(STORES * THREADS_PER_STORE) as pool:
        return list(pool.map(one, range(attempts)))


def test_racing_creates_never_exceed_the_quota(stores: list[Store]) -> None:
    limit = 5
    user = stores[0].create_user("alice", quotas=Quotas(max_sandboxes=limit))[0]
    results = _race(
        stores,
        40,
        lambda s, i: s.create_sandbox(user.id, image="m", engine="fake", name=f"sb{i}"),
    )
    created = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(created) == limit
    assert all(isinstance(r, QuotaExceeded) for r in refused), refused
    assert stores[1].count_sandboxes(user.id) == limit
    # A second round after deleting some: the quota is still exact.
    for sb in stores[0].list_sandboxes(user.id)[:2]:
        stores[1].delete_sandbox(sb.id)
    results = _race(
        stores,
        20,
        lambda s, i: s.create_sandbox(user.id, image="m", engine="fake", name=f"again{i}"),
    )
    assert sum(not isinstance(r, Exception) for r in results) == 2
    assert stores[0].count_sandboxes(user.id) == limit


def test_racing_creates_of_one_name_make_one_sandbox(stores: list[Store]) -> None:
    user = stores[0].create_user("alice")[0]
    results = _race(
        stores, 16, lambda s, i: s.create_sandbox(user.id, image="m", engine="fake", name="web")
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, NameTaken) for r in results if isinstance(r, Exception))
    assert [sb.name for sb in stores[1].list_sandboxes(user.id)] == ["web"]


def test_racing_attaches_of_one_volume_attach_it_once(stores: list[Store]) -> None:
    user = stores[0].create_user("alice")[0]
    stores[0].create_volume(user.id, "data", 16, "/v/data.ext4")
    config = SandboxConfig(volumes=(VolumeMount("data", "/data"),))
    results = _race(
        stores,
        16,
        lambda s, i: s.create_sandbox(user.id, image="m", engine="fake", config=config),
    )
    winners = [r for r in results if isinstance(r, Sandbox)]
    assert len(winners) == 1
    assert all(isinstance(r, VolumeInUse) for r in results if not isinstance(r, Sandbox))
    assert stores[1].get_volume(user.id, "data").attached_to == winners[0].id


def test_users_do_not_share_a_quota_under_concurrency(stores: list[Store]) -> None:
    users = [stores[0].create_user(f"u{n}", quotas=Quotas(max_sandboxes=3))[0] for n in range(4)]
    results = _race(
        stores,
        48,
        lambda s, i: s.create_sandbox(
            users[i % 4].id,
            image="m",
            engine="fake",
            new_volumes=[NewVolume(f"v{i}", 1, f"/v/{i}")],
        ),
    )
    assert sum(not isinstance(r, Exception) for r in results) == 12
    assert [stores[1].count_sandboxes(u.id) for u in users] == [3, 3, 3, 3]


def test_a_deadlocked_write_is_retried(stores: list[Store], pg_url: str) -> None:
    """A write that PostgreSQL picks as a deadlock victim runs again and succeeds."""
    store = stores[0]
    user = store.create_user("alice")[0]
    done: list[object] = []
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user.id,))
        # set_quotas takes kiln's global lock, then waits for the row `other` holds ...
        writer = threading.Thread(
            target=lambda: done.append(store.set_quotas(user.id, Quotas(max_cpus=2)))
        )
        writer.start()
        _wait_for_lock_waiter(pg_url, "transactionid")
        # ... and `other` now waits for the global lock: a cycle. The writer started
        # waiting first, so its deadlock check fires first and it is the victim.
        other.execute("SELECT pg_advisory_xact_lock(%s, 0)", (GLOBAL_LOCK,))
        other.execute("COMMIT")
        writer.join(30)
    assert not writer.is_alive()
    assert len(done) == 1
    assert stores[1].get_user(user.id).quotas == Quotas(max_cpus=2)


def _wait_for_lock_waiter(url: str, locktype: str) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        for _ in range(500):
            row = admin.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = %s", (locktype,)
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.01)
    raise AssertionError(f"nobody waited for a {locktype} lock")


def test_concurrent_first_opens_migrate_once(pg_url: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        opened = list(pool.map(lambda _: Store.open(pg_url), range(4)))
    try:
        assert {s.schema_version for s in opened} == {LATEST_VERSION}
        assert opened[0].integrity_check() == []
    finally:
        for s in opened:
            s.close()


def test_newer_database_is_refused(pg_url: str) -> None:
    Store.open(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (LATEST_VERSION + 1,))
    with pytest.raises(SchemaError, match="newer"):
        Store.open(pg_url)


def test_database_of_something_else_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (x INTEGER)")
    with pytest.raises(SchemaError, match="version 1"):
        Store.open(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # all rolled back, even the version
        assert conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,)


def test_unreachable_server_is_a_clear_error(postgres_server: PostgresServer) -> None:
    url = postgres_server.url("no_such_database")
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        Store.open(url)


def test_password_never_shows(postgres_server: PostgresServer) -> None:
    url = f"postgresql://kiln:hunter2@127.0.0.1:{postgres_server.port}/nope"
    assert redact(url) == f"postgresql://kiln@127.0.0.1:{postgres_server.port}/nope"
    with pytest.raises(StoreUnavailable) as err:
        Store.open(url)
    assert "hunter2" not in str(err.value)


def test_dropped_connection_is_reopened_on_the_next_call(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        user = store.create_user("alice")[0]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'kiln' AND datname = current_database()"
            )
        with pytest.raises(StoreUnavailable, match="lost the connection"):
            store.get_user(user.id)
        assert store.get_user(user.id) == user
        store.create_sandbox(user.id, image="m", engine="fake", name="after")
        assert [sb.name for sb in store.list_sandboxes(user.id)] == ["after"]


def test_server_down_then_back() -> None:
    """While the server is down every call fails quickly with StoreUnavailable; once it
    is back, the same store works again (its own server: this one is stopped)."""
    with PostgresServer.start() as server:
        url = server.create_database()
        with Store.open(url) as store:
            user = store.create_user("alice")[0]
            server.pause()
            for call in (
                lambda: store.get_user(user.id),
                lambda: store.create_sandbox(user.id, image="m", engine="fake"),
                lambda: store.list_sandboxes(user.id),
            ):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    call()
                assert time.monotonic() - t0 < 10
            server.resume()
            # Calls keep failing at once for the back-off after the last failed connect.
            time.sleep(RECONNECT_BACKOFF_S)
            sb = store.create_sandbox(user.id, image="m", engine="fake", name="back")
            assert store.find_sandbox(user.id, "back") == sb


def test_portable_types(pg_url: str) -> None:
    """Times keep their sub-second part, sizes past 2^31 fit, ciphertexts are bytes."""
    with Store.open(pg_url) as store:
        user = store.create_user("alice")[0]
        image = store.add_image(
            user.id,
            "big",
            ref="kiln/big:1",
            kind="packages",
            digest="sha256:0",
            size_bytes=5 << 30,
            definition={},
        )
        assert store.find_image(user.id, "big").size_bytes == image.size_bytes == 5 << 30
        sb = store.create_sandbox(user.id, image="m", engine="fake", expires_at=1_900_000_000.25)
        assert store.get_sandbox(sb.id).expires_at == 1_900_000_000.25
    with psycopg.connect(pg_url, autocommit=True) as conn:
        types = dict(
            conn.execute(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema()"
            ).fetchall()
        )
    assert types["sandboxes.created_at"] == "double precision"
    assert types["images.size_bytes"] == "bigint"
    assert types["secrets.ciphertext"] == "bytea"
    assert types["users.is_admin"] == "bigint"


def test_racing_claims_of_a_lost_nodes_sandbox_move_it_once(stores: list[Store]) -> None:
    user = stores[0].create_user("alice")[0]
    fields = {"engines": ("qemu",), "cpus": 2, "memory_mb": 1024, "disk_mb": 1024}
    stores[0].register_node("lost", address="http://lost", lease_s=-1.0, **fields)  # type: ignore[arg-type]
    sb = stores[0].create_sandbox(user.id, image="m", engine="qemu", name="s", node="lost")
    results = _race(
        stores,
        16,
        lambda s, i: s.claim_sandbox(sb.id, from_node="lost", to_node=f"node-{i}"),
    )
    winners = [r for r in results if isinstance(r, Sandbox)]
    assert len(winners) == 1, results
    assert all(r is None for r in results if not isinstance(r, Sandbox)), results
    assert stores[1].get_sandbox(sb.id).node == winners[0].node
