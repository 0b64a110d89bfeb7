"""Labels, expiry and ``on_expire`` in the store, including the migration of an old database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kiln.engine import Status
from kiln.store import (
    LATEST_VERSION,
    UNSET,
    InvalidValue,
    OnExpire,
    Store,
    User,
    check_labels,
    migrate,
)


def test_labels_and_expiry_round_trip(store: Store, alice: User) -> None:
    sb = store.create_sandbox(
        alice.id,
        image="minimal",
        engine="fake",
        name="a",
        labels={"team": "ml", "env": ""},
        expires_at=1_700_000_500.5,
        on_expire=OnExpire.STOP,
    )
    again = store.get_sandbox(sb.id)
    assert again.labels == {"team": "ml", "env": ""}
    assert again.expires_at == 1_700_000_500.5
    assert again.on_expire is OnExpire.STOP
    plain = store.create_sandbox(alice.id, image="minimal", engine="fake", name="b")
    assert (plain.labels, plain.expires_at, plain.on_expire) == ({}, None, OnExpire.DESTROY)


def test_list_filters_on_every_label(store: Store, alice: User) -> None:
    def make(name: str, **labels: str) -> None:
        store.create_sandbox(alice.id, image="m", engine="fake", name=name, labels=labels)

    make("a", team="ml", env="dev")
    make("b", team="ml", env="prod")
    make("c", team="web")
    make("d")

    def names(**wanted: str) -> list[str]:
        return [sb.name for sb in store.list_sandboxes(alice.id, labels=wanted)]

    assert names() == ["a", "b", "c", "d"]
    assert names(team="ml") == ["a", "b"]
    assert names(team="ml", env="prod") == ["b"]
    assert names(team="nope") == []
    assert names(env="") == []  # an absent label is not an empty one


def test_update_replaces_labels_and_moves_or_clears_expiry(store: Store, alice: User) -> None:
    sb = store.create_sandbox(
        alice.id, image="m", engine="fake", labels={"a": "1", "b": "2"}, expires_at=100.0
    )
    sb = store.update_sandbox(sb.id, labels={"c": "3"})
    assert sb.labels == {"c": "3"} and sb.expires_at == 100.0  # expiry left alone
    sb = store.update_sandbox(sb.id, expires_at=200.0, on_expire=OnExpire.STOP)
    assert (sb.expires_at, sb.on_expire) == (200.0, OnExpire.STOP)
    sb = store.update_sandbox(sb.id, expires_at=UNSET, status=Status.STOPPED)
    assert sb.expires_at == 200.0
    sb = store.update_sandbox(sb.id, expires_at=None)
    assert sb.expires_at is None and sb.labels == {"c": "3"}
    with pytest.raises(InvalidValue, match="finite"):
        store.update_sandbox(sb.id, expires_at=float("nan"))


def test_list_expiring_has_live_sandboxes_with_an_expiry_soonest_first(
    store: Store, alice: User
) -> None:
    late = store.create_sandbox(alice.id, image="m", engine="fake", name="late", expires_at=300.0)
    soon = store.create_sandbox(alice.id, image="m", engine="fake", name="soon", expires_at=100.0)
    store.create_sandbox(alice.id, image="m", engine="fake", name="never")
    gone = store.create_sandbox(alice.id, image="m", engine="fake", name="gone", expires_at=50.0)
    store.delete_sandbox(gone.id)
    assert [sb.id for sb in store.list_expiring()] == [soon.id, late.id]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"": "x"}, "non-empty"),
        ({"a=b": "x"}, "without '='"),
        ({"k" * 129: "x"}, "over 128"),
        ({"k": "v" * 257}, "over 256"),
        ({"k": "line\nbreak"}, "printable"),
        ({"k": 1}, "must be a string"),
        ({f"k{i}": "v" for i in range(65)}, "at most 64"),
        (["k", "v"], "must be an object"),
    ],
)
def test_bad_labels_are_refused_with_a_reason(labels: object, message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        check_labels(labels)


def test_bad_labels_never_reach_the_database(store: Store, alice: User) -> None:
    with pytest.raises(InvalidValue):
        store.create_sandbox(alice.id, image="m", engine="fake", labels={"": "x"})
    assert store.list_sandboxes(alice.id) == []


def _v2_database(path: Path) -> None:
    """A database as release 2 (publish rules, no lifecycle columns) left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    assert migrate(conn, target=2) == 2
    conn.execute(
        "INSERT INTO users (id, name, key_hash, created_at) VALUES ('u-1', 'old', 'h', 1.0)"
    )
    conn.execute(
        "INSERT INTO sandboxes (id, user_id, name, cpus, memory_mb, image, status, thermal,"
        " engine, created_at, last_active_at)"
        " VALUES ('sb-1', 'u-1', 'box', 1, 512, 'minimal', 'running', 'hot', 'qemu', 1.0, 2.0)"
    )
    conn.close()


def test_a_v2_database_migrates_and_its_sandboxes_get_no_labels_or_expiry(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    _v2_database(path)
    with Store.open(path) as store:
        assert store.schema_version == LATEST_VERSION
        old = store.get_sandbox("sb-1")
        assert (old.name, old.labels, old.expires_at, old.on_expire) == (
            "box",
            {},
            None,
            OnExpire.DESTROY,
        )
        assert store.list_expiring() == []
        updated = store.update_sandbox("sb-1", labels={"k": "v"}, expires_at=5.0)
        assert store.list_expiring() == [updated]
        assert store.integrity_check() == []
    conn = sqlite3.connect(path)
    try:
        # The column's CHECK came with the migration: the database itself refuses junk.
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE sandboxes SET on_expire = 'explode'")
    finally:
        conn.close()
