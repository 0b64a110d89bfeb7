"""The database schema as a list of forward migrations.

``PRAGMA user_version`` holds how many migrations a database has had. Migration
``n`` (1-based) is ``MIGRATIONS[n - 1]``; each runs in its own transaction
together with the version bump, so a crash leaves the database at the previous
version or the next, never between. Never edit a released migration: append a
new one.

Tables are ``STRICT``: SQLite refuses a float in an ``INTEGER`` column instead
of storing it, so counts read back as ``int``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from .errors import SchemaError

Migration = Callable[[sqlite3.Connection], None]


def _run(conn: sqlite3.Connection, statements: Sequence[str]) -> None:
    # Not executescript(): it commits first, which would break the migration's transaction.
    for statement in statements:
        conn.execute(statement)


def _v1_initial(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            """CREATE TABLE users (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                key_hash TEXT NOT NULL UNIQUE,
                is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
                max_sandboxes INTEGER CHECK (max_sandboxes >= 0),
                max_cpus INTEGER CHECK (max_cpus >= 0),
                max_memory_mb INTEGER CHECK (max_memory_mb >= 0),
                created_at REAL NOT NULL
            ) STRICT""",
            """CREATE TABLE sandboxes (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                cpus INTEGER NOT NULL CHECK (cpus > 0),
                memory_mb INTEGER NOT NULL CHECK (memory_mb > 0),
                image TEXT NOT NULL,
                keep_hot INTEGER NOT NULL DEFAULT 0 CHECK (keep_hot IN (0, 1)),
                status TEXT NOT NULL,
                thermal TEXT NOT NULL,
                ip TEXT,
                engine TEXT NOT NULL,
                engine_state TEXT,
                spec TEXT NOT NULL DEFAULT '{}',
                created_at REAL NOT NULL,
                last_active_at REAL NOT NULL,
                deleted_at REAL
            ) STRICT""",
            # A name is unique per user among live sandboxes only: a deleted
            # sandbox's name can be reused.
            """CREATE UNIQUE INDEX sandboxes_live_name
                ON sandboxes(user_id, name) WHERE deleted_at IS NULL""",
            "CREATE INDEX sandboxes_live_engine ON sandboxes(engine) WHERE deleted_at IS NULL",
            """CREATE TABLE templates (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                spec TEXT NOT NULL,
                created_at REAL NOT NULL,
                UNIQUE (user_id, name)
            ) STRICT""",
            """CREATE TABLE secrets (
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                ciphertext BLOB NOT NULL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                PRIMARY KEY (user_id, name)
            ) STRICT""",
            """CREATE TABLE volumes (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                size_mb INTEGER NOT NULL CHECK (size_mb > 0),
                path TEXT NOT NULL,
                created_at REAL NOT NULL,
                UNIQUE (user_id, name)
            ) STRICT""",
            # One row per volume in use: a volume is attached to at most one
            # sandbox, a mount point used once per sandbox.
            """CREATE TABLE volume_attachments (
                volume_id TEXT PRIMARY KEY REFERENCES volumes(id) ON DELETE CASCADE,
                sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
                mount TEXT NOT NULL,
                UNIQUE (sandbox_id, mount)
            ) STRICT""",
        ],
    )


def _v2_publish_rules(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            """CREATE TABLE publish_rules (
                id TEXT PRIMARY KEY,
                sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
                port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
                alias TEXT NOT NULL UNIQUE,
                created_at REAL NOT NULL,
                UNIQUE (sandbox_id, port)
            ) STRICT""",
        ],
    )


def _v3_lifecycle(conn: sqlite3.Connection) -> None:
    # Existing sandboxes get no labels and no expiry: exactly what they had.
    _run(
        conn,
        [
            "ALTER TABLE sandboxes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE sandboxes ADD COLUMN expires_at REAL",
            """ALTER TABLE sandboxes ADD COLUMN on_expire TEXT NOT NULL DEFAULT 'destroy'
                CHECK (on_expire IN ('destroy', 'stop'))""",
            # The expiry loop asks for this every second: only live rows with an expiry.
            """CREATE INDEX sandboxes_live_expiry ON sandboxes(expires_at)
                WHERE deleted_at IS NULL AND expires_at IS NOT NULL""",
        ],
    )


def _v4_saved_images(conn: sqlite3.Connection) -> None:
    # A sandbox saved as an image (disk, and memory where its engine can): private to
    # its owner, named uniquely per owner; ``image_id`` names the engine's files.
    _run(
        conn,
        [
            """CREATE TABLE saved_images (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                engine TEXT NOT NULL,
                tier TEXT NOT NULL,
                cpus INTEGER NOT NULL CHECK (cpus > 0),
                memory_mb INTEGER NOT NULL CHECK (memory_mb > 0),
                size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
                memory INTEGER NOT NULL CHECK (memory IN (0, 1)),
                source_id TEXT NOT NULL,
                spec TEXT NOT NULL DEFAULT '{}',
                created_at REAL NOT NULL,
                UNIQUE (user_id, name)
            ) STRICT""",
        ],
    )


def _v5_images(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            # owner NULL: a global image (an admin's build); ref: the name engines and
            # the image cache know it by, unique across owners.
            """CREATE TABLE images (
                id TEXT PRIMARY KEY,
                owner TEXT REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                ref TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL CHECK (kind IN ('tier', 'packages', 'dockerfile', 'saved')),
                digest TEXT NOT NULL,
                size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
                definition TEXT NOT NULL DEFAULT '{}',
                created_at REAL NOT NULL
            ) STRICT""",
            # One name per owner, and one global image per name (NULLs are distinct
            # in a plain UNIQUE constraint, hence the expression).
            "CREATE UNIQUE INDEX images_owner_name ON images(COALESCE(owner, ''), name)",
            "ALTER TABLE users ADD COLUMN max_image_disk_mb INTEGER CHECK (max_image_disk_mb >= 0)",
        ],
    )


MIGRATIONS: tuple[Migration, ...] = (
    _v1_initial,
    _v2_publish_rules,
    _v3_lifecycle,
    _v4_saved_images,
    _v5_images,
)
LATEST_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, target: int = LATEST_VERSION) -> int:
    """Bring the database up to ``target`` (default: the latest); return the new version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Raises
    :class:`SchemaError` for a database newer than this code knows.
    """
    if not 0 <= target <= LATEST_VERSION:
        raise ValueError(f"target version must be within 0..{LATEST_VERSION}, got {target}")
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read inside the write transaction: another process may have migrated
            # between our last look and now.
            version = schema_version(conn)
            if version > LATEST_VERSION:
                raise SchemaError(
                    f"database schema version {version} is newer than this kiln "
                    f"understands ({LATEST_VERSION}); upgrade kiln"
                )
            if version >= target:
                conn.execute("COMMIT")
                return version
            try:
                MIGRATIONS[version](conn)
            except sqlite3.Error as exc:
                raise SchemaError(
                    f"migration to schema version {version + 1} failed: {exc}"
                ) from exc
            # PRAGMA does not take parameters; the value is our own int.
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
