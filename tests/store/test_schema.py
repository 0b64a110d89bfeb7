from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kiln.engine import Status, Thermal
from kiln.store import LATEST_VERSION, MIGRATIONS, SchemaError, Store, migrate


def _v1_database(path: Path) -> None:
    """A database as the first release left it, with some rows in it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    assert migrate(conn, target=1) == 1
    conn.execute(
        "INSERT INTO users (id, name, key_hash, is_admin, created_at)"
        " VALUES ('u-1', 'old', 'h', 1, 100.0)"
    )
    conn.execute(
        "INSERT INTO sandboxes (id, user_id, name, cpus, memory_mb, image, keep_hot, status,"
        " thermal, engine, engine_state, spec, created_at, last_active_at)"
        " VALUES ('sb-1', 'u-1', 'box', 2, 512, 'minimal', 1, 'running', 'cold', 'qemu',"
        " '{\"pid\": 7}', '{}', 100.0, 150.0)"
    )
    conn.close()


def test_fresh_database_is_latest(tmp_path: Path) -> None:
    with Store.open(tmp_path / "new.db") as store:
        assert store.schema_version == LATEST_VERSION == len(MIGRATIONS)
        assert store.integrity_check() == []
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o600


def test_old_version_upgrades_and_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _v1_database(path)
    with Store.open(path) as store:
        assert store.schema_version == LATEST_VERSION
        sb = store.get_sandbox("sb-1")
        assert (sb.cpus, sb.keep_hot, sb.thermal, sb.status) == (
            2,
            True,
            Thermal.COLD,
            Status.RUNNING,
        )
        assert type(sb.cpus) is int and type(sb.keep_hot) is bool
        assert sb.engine_state == {"pid": 7}
        assert store.get_user("u-1").is_admin is True
        # the table added by migration 2 works
        rule = store.add_publish_rule("sb-1", 8080, "legacy")
        assert store.list_publish_rules("sb-1") == [rule]
        assert store.integrity_check() == []


def test_reopening_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store.open(path) as s:
        user, key = s.create_user("u")
    with Store.open(path) as s:
        assert s.user_by_key(key) == user
        assert s.schema_version == LATEST_VERSION


def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        Store.open(path)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SchemaError, match="not a usable kiln database"):
        Store.open(path)


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "clash.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=1)
    conn.execute("CREATE TABLE publish_rules (x INTEGER)")  # in the way of migration 2
    conn.close()
    with pytest.raises(SchemaError, match="version 2"):
        Store.open(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_migrate_rejects_unknown_target(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    with pytest.raises(ValueError):
        migrate(conn, target=LATEST_VERSION + 1)
    conn.close()


def test_pragmas(tmp_path: Path) -> None:
    with Store.open(tmp_path / "p.db") as store:
        conn = store._backend.connection()  # the one connection; checking its settings
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


V5_DUMP = Path(__file__).parent / "data" / "kiln-v5.sql"


def _schema(path: Path) -> list[tuple[str, str, str | None]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        return [(str(t), str(n), s) for t, n, s in rows]
    finally:
        conn.close()


def test_database_of_the_release_before_postgres_opens_unchanged(tmp_path: Path) -> None:
    """A v5 file written by the last SQLite-only release: migrated to the same schema
    as a fresh database (whose SQL text is the old releases' own), rows readable,
    writable."""
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old, isolation_level=None)
    conn.executescript(V5_DUMP.read_text())
    conn.close()
    with Store.open(old) as store:
        assert store.schema_version == LATEST_VERSION == 8
        assert store.integrity_check() == []
        admin = store.user_by_name("old-admin")
        assert admin.is_admin and admin.quotas.max_image_disk_mb == 100
        sb = store.find_sandbox(admin.id, "box")
        assert (sb.cpus, sb.memory_mb, sb.labels, sb.engine_state) == (
            2,
            1024,
            {"team": "a"},
            {"pid": 7},
        )
        assert sb.expires_at == 1_800_000_000.0
        assert [v.attached_to for v in store.list_volumes(admin.id)] == [sb.id]
        assert [r.alias for r in store.list_publish_rules(sb.id)] == ["web"]
        assert store.get_sandbox("sb-old2", include_deleted=True).deleted_at is not None
        assert store.find_image(admin.id, "py").size_bytes == 5_000_000_000
        assert store.get_saved_image(admin.id, "snap").size_bytes == 123_456_789
        assert [t.name for t in store.list_templates(admin.id)] == ["tpl"]
        store.touch(sb.id, 2e9)
        assert store.get_sandbox(sb.id).last_active_at == 2e9
    Store.open(tmp_path / "fresh.db").close()
    assert _schema(old) == _schema(tmp_path / "fresh.db")
