"""The database schema as a list of forward migrations, one definition for both engines.

A migration is a tuple of DDL statements written once, with ``$INT``, ``$REAL``,
``$BLOB`` and ``$STRICT`` where SQLite and PostgreSQL spell a type differently
(:class:`SchemaDialect` fills them in). On SQLite they expand to exactly the
text earlier releases ran (``INTEGER``, ``REAL``, ``BLOB``, `` STRICT``), so an
existing database and a new one have the same schema; on PostgreSQL to
``BIGINT`` (SQLite's integers are 64-bit: the same range on both), ``DOUBLE
PRECISION`` (a ``REAL`` there would be 4 bytes and lose seconds off a Unix
time) and ``BYTEA``. Booleans stay integers 0/1 on both, so one query and one
row reader serve both.

The version is how many migrations a database has had: ``PRAGMA user_version``
on SQLite (where every release so far kept it), a one-row ``schema_version``
table on PostgreSQL. Migration ``n`` (1-based) is ``MIGRATIONS[n - 1]``; each
runs in its own transaction together with the version bump (DDL is
transactional on both), so a crash leaves the database at the previous version
or the next, never between; concurrent openers (several daemons on one
PostgreSQL) are serialized by the dialect's migration lock. Never edit a
released migration: append a new one.

SQLite tables are ``STRICT``: SQLite refuses a float in an ``INTEGER`` column
instead of storing it, so counts read back as ``int``.
"""

from __future__ import annotations

from collections.abc import Mapping
from string import Template
from typing import Any, Protocol

from .backend import Connection
from .errors import SchemaError

Migration = tuple[str, ...]


class SchemaDialect(Protocol):
    """How one database engine runs migrations."""

    #: Values for ``$INT``, ``$REAL``, ``$BLOB`` and ``$STRICT`` in the DDL.
    types: Mapping[str, str]
    #: The driver's exception base class (a failed statement aborts the migration).
    error: type[Exception]

    def begin_migration(self, conn: Connection) -> None:
        """Start the migration transaction, excluding every other migrator and writer."""
        ...

    def version(self, conn: Connection) -> int: ...

    def set_version(self, conn: Connection, version: int) -> None: ...


class SqliteSchema:
    """SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock; the version is
    ``PRAGMA user_version``."""

    types: Mapping[str, str] = {
        "INT": "INTEGER",
        "REAL": "REAL",
        "BLOB": "BLOB",
        "STRICT": " STRICT",
    }
    error: type[Exception]

    def __init__(self) -> None:
        import sqlite3  # noqa: PLC0415 -- keeps this module free of either driver at import

        self.error = sqlite3.Error

    def begin_migration(self, conn: Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def version(self, conn: Connection) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def set_version(self, conn: Connection, version: int) -> None:
        # PRAGMA does not take parameters; the value is our own int.
        conn.execute(f"PRAGMA user_version = {version:d}")


SQLITE = SqliteSchema()


_V1_INITIAL: Migration = (
    """CREATE TABLE users (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                key_hash TEXT NOT NULL UNIQUE,
                is_admin $INT NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
                max_sandboxes $INT CHECK (max_sandboxes >= 0),
                max_cpus $INT CHECK (max_cpus >= 0),
                max_memory_mb $INT CHECK (max_memory_mb >= 0),
                created_at $REAL NOT NULL
            )$STRICT""",
    """CREATE TABLE sandboxes (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                cpus $INT NOT NULL CHECK (cpus > 0),
                memory_mb $INT NOT NULL CHECK (memory_mb > 0),
                image TEXT NOT NULL,
                keep_hot $INT NOT NULL DEFAULT 0 CHECK (keep_hot IN (0, 1)),
                status TEXT NOT NULL,
                thermal TEXT NOT NULL,
                ip TEXT,
                engine TEXT NOT NULL,
                engine_state TEXT,
                spec TEXT NOT NULL DEFAULT '{}',
                created_at $REAL NOT NULL,
                last_active_at $REAL NOT NULL,
                deleted_at $REAL
            )$STRICT""",
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
                created_at $REAL NOT NULL,
                UNIQUE (user_id, name)
            )$STRICT""",
    """CREATE TABLE secrets (
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                ciphertext $BLOB NOT NULL,
                created_at $REAL NOT NULL,
                updated_at $REAL NOT NULL,
                PRIMARY KEY (user_id, name)
            )$STRICT""",
    """CREATE TABLE volumes (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                size_mb $INT NOT NULL CHECK (size_mb > 0),
                path TEXT NOT NULL,
                created_at $REAL NOT NULL,
                UNIQUE (user_id, name)
            )$STRICT""",
    # One row per volume in use: a volume is attached to at most one
    # sandbox, a mount point used once per sandbox.
    """CREATE TABLE volume_attachments (
                volume_id TEXT PRIMARY KEY REFERENCES volumes(id) ON DELETE CASCADE,
                sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
                mount TEXT NOT NULL,
                UNIQUE (sandbox_id, mount)
            )$STRICT""",
)


_V2_PUBLISH_RULES: Migration = (
    """CREATE TABLE publish_rules (
                id TEXT PRIMARY KEY,
                sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
                port $INT NOT NULL CHECK (port BETWEEN 1 AND 65535),
                alias TEXT NOT NULL UNIQUE,
                created_at $REAL NOT NULL,
                UNIQUE (sandbox_id, port)
            )$STRICT""",
)


_V3_LIFECYCLE: Migration = (
    # Existing sandboxes get no labels and no expiry: exactly what they had.
    "ALTER TABLE sandboxes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE sandboxes ADD COLUMN expires_at $REAL",
    """ALTER TABLE sandboxes ADD COLUMN on_expire TEXT NOT NULL DEFAULT 'destroy'
                CHECK (on_expire IN ('destroy', 'stop'))""",
    # The expiry loop asks for this every second: only live rows with an expiry.
    """CREATE INDEX sandboxes_live_expiry ON sandboxes(expires_at)
                WHERE deleted_at IS NULL AND expires_at IS NOT NULL""",
)


_V4_SAVED_IMAGES: Migration = (
    # A sandbox saved as an image (disk, and memory where its engine can): private to
    # its owner, named uniquely per owner; ``image_id`` names the engine's files.
    """CREATE TABLE saved_images (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                engine TEXT NOT NULL,
                tier TEXT NOT NULL,
                cpus $INT NOT NULL CHECK (cpus > 0),
                memory_mb $INT NOT NULL CHECK (memory_mb > 0),
                size_bytes $INT NOT NULL CHECK (size_bytes >= 0),
                memory $INT NOT NULL CHECK (memory IN (0, 1)),
                source_id TEXT NOT NULL,
                spec TEXT NOT NULL DEFAULT '{}',
                created_at $REAL NOT NULL,
                UNIQUE (user_id, name)
            )$STRICT""",
)


_V5_IMAGES: Migration = (
    # owner NULL: a global image (an admin's build); ref: the name engines and
    # the image cache know it by, unique across owners.
    """CREATE TABLE images (
                id TEXT PRIMARY KEY,
                owner TEXT REFERENCES users(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                ref TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL CHECK (kind IN ('tier', 'packages', 'dockerfile', 'saved')),
                digest TEXT NOT NULL,
                size_bytes $INT NOT NULL CHECK (size_bytes >= 0),
                definition TEXT NOT NULL DEFAULT '{}',
                created_at $REAL NOT NULL
            )$STRICT""",
    # One name per owner, and one global image per name (NULLs are distinct
    # in a plain UNIQUE constraint, hence the expression).
    "CREATE UNIQUE INDEX images_owner_name ON images(COALESCE(owner, ''), name)",
    "ALTER TABLE users ADD COLUMN max_image_disk_mb $INT CHECK (max_image_disk_mb >= 0)",
)


_V6_SETTINGS: Migration = (
    # Facts about the whole store, one value per name: which secret key seals its
    # secrets, so a daemon with another key file is noticed at start (several
    # daemons share one PostgreSQL store).
    """CREATE TABLE settings (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )$STRICT""",
)


_V7_NODES: Migration = (
    # The daemons sharing this store (a cluster on PostgreSQL; a SQLite store has
    # none). address: the base URL other nodes reach its API at; engines: a JSON
    # list ("qemu", "docker/runc", ...); lease_until: the node is lost once it
    # passes unrenewed; starting: creates placed there and not yet running.
    """CREATE TABLE nodes (
                name TEXT PRIMARY KEY,
                address TEXT NOT NULL,
                engines TEXT NOT NULL DEFAULT '[]',
                cpus $INT NOT NULL CHECK (cpus >= 0),
                memory_mb $INT NOT NULL CHECK (memory_mb >= 0),
                disk_mb $INT NOT NULL CHECK (disk_mb >= 0),
                load $REAL NOT NULL DEFAULT 0,
                state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining')),
                starting $INT NOT NULL DEFAULT 0 CHECK (starting >= 0),
                registered_at $REAL NOT NULL,
                lease_until $REAL NOT NULL
            )$STRICT""",
    # The node a sandbox lives on (NULL: a single daemon's store, or made before).
    "ALTER TABLE sandboxes ADD COLUMN node TEXT",
    "CREATE INDEX sandboxes_live_node ON sandboxes(node) WHERE deleted_at IS NULL",
)


_V8_NODE_RESERVATIONS: Migration = (
    # What the creates counted in ``starting`` asked for: placement counts them as
    # taken until the create is done, so two nodes placing at once cannot both fill
    # the same free capacity before either sandbox row exists.
    "ALTER TABLE nodes ADD COLUMN starting_cpus $INT NOT NULL DEFAULT 0",
    "ALTER TABLE nodes ADD COLUMN starting_memory_mb $INT NOT NULL DEFAULT 0",
    # When the latest of them was counted: long after, they are leftovers of a
    # placing node that died before giving them back.
    "ALTER TABLE nodes ADD COLUMN starting_since $REAL",
)


MIGRATIONS: tuple[Migration, ...] = (
    _V1_INITIAL,
    _V2_PUBLISH_RULES,
    _V3_LIFECYCLE,
    _V4_SAVED_IMAGES,
    _V5_IMAGES,
    _V6_SETTINGS,
    _V7_NODES,
    _V8_NODE_RESERVATIONS,
)
LATEST_VERSION = len(MIGRATIONS)


def statements(migration: Migration, dialect: SchemaDialect) -> list[str]:
    """A migration's statements in ``dialect``'s SQL."""
    return [Template(s).substitute(dialect.types) for s in migration]


def schema_version(conn: Connection, dialect: SchemaDialect = SQLITE) -> int:
    return dialect.version(conn)


def migrate(conn: Any, target: int = LATEST_VERSION, *, dialect: SchemaDialect = SQLITE) -> int:
    """Bring the database up to ``target`` (default: the latest); return the new version.

    ``conn`` must be in autocommit mode (``isolation_level=None`` for sqlite3).
    Raises :class:`SchemaError` for a database newer than this code knows.
    """
    if not 0 <= target <= LATEST_VERSION:
        raise ValueError(f"target version must be within 0..{LATEST_VERSION}, got {target}")
    while True:
        dialect.begin_migration(conn)
        try:
            # Read inside the write transaction: another process may have migrated
            # between our last look and now.
            version = dialect.version(conn)
            if version > LATEST_VERSION:
                raise SchemaError(
                    f"database schema version {version} is newer than this kiln "
                    f"understands ({LATEST_VERSION}); upgrade kiln"
                )
            if version >= target:
                conn.execute("COMMIT")
                return version
            try:
                # Not executescript(): it commits first, which would break the transaction.
                for statement in statements(MIGRATIONS[version], dialect):
                    conn.execute(statement)
            except dialect.error as exc:
                raise SchemaError(
                    f"migration to schema version {version + 1} failed: {exc}"
                ) from exc
            dialect.set_version(conn, version + 1)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
