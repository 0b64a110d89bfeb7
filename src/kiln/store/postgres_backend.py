"""PostgreSQL under the store (psycopg 3), for several daemons sharing one database.

One connection per :class:`~kiln.store.Store`, in autocommit mode like the
SQLite one, so a read is one statement and a write an explicit ``BEGIN …
COMMIT``. The store's queries use ``?``; they are rewritten to psycopg's ``%s``
(once per distinct query), and psycopg prepares on the server a query that has
run a few times.

Concurrency. Several daemons (hosts) write at once, and a write transaction
checks invariants before it changes rows: a user's quota of live sandboxes, a
live sandbox name free for its owner, a volume not attached elsewhere, no live
sandbox on an image about to be deleted. Under PostgreSQL's default READ
COMMITTED two such transactions could both pass the check and both commit.
SQLite's ``BEGIN IMMEDIATE`` rules that out by admitting one writer at a time;
here transaction-scoped advisory locks do the same, in two levels:

* a write whose invariants span users (deleting an image, setting quotas,
  publishing an alias, changing a sandbox by id) takes the *global* lock
  exclusively: it runs alone, exactly as on SQLite;
* a write whose checks read only one user's rows (creating a sandbox: quota,
  name, volumes; a user's templates, secrets, volumes, saved images; deleting
  the user) takes the global lock *shared* plus that user's lock exclusively:
  writes for different users run at once, two for one user queue. Per user
  because that is where the contention is (many users creating sandboxes at
  once on many nodes), and the invariants it guards are per user.

Locks are always taken in that order (global, then user) at the start of the
transaction, so kiln's own transactions cannot deadlock on them; unique
constraints still back every name check. Deadlocks and serialization failures
(from statements outside kiln, or a future stricter isolation) surface as
:class:`~kiln.store.backend.RetryableConflict`, which the store retries.
``lock_timeout`` bounds the wait for a lock (the SQLite ``busy_timeout``).

A connection that drops (server restart, network) is noticed by the call that
uses it, which fails with :class:`~kiln.store.StoreUnavailable`; the next call
connects again. While the server is down every call fails that way, quickly
and clearly; nothing crashes. The daemon calls the store from its event loop,
so no call may hang: a failed connect is not retried for
:data:`RECONNECT_BACKOFF_S` (calls in between fail at once), connecting gives
up after :data:`CONNECT_TIMEOUT_S`, and TCP keepalives plus
``tcp_user_timeout`` end a connection to a host that vanished mid-query
(unless the URL sets them otherwise).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import RowMaker

from .backend import Connection, Cursor, RetryableConflict
from .errors import InvalidValue, NameTaken, NotFound, SchemaError, StoreError, StoreUnavailable
from .schema import migrate

#: Advisory lock keys (two-int form): ("kiln", 0) is the global lock; ("kilu", n)
#: the lock of users whose id hashes to n.
GLOBAL_LOCK = 0x6B696C6E
USER_LOCK = 0x6B696C75
CONNECT_TIMEOUT_S = 5
#: After a failed connect, calls fail at once for this long instead of each waiting
#: for a server that is down.
RECONNECT_BACKOFF_S = 1.0
#: libpq settings that bound how long a dead peer can hold a call (the URL wins).
_LIVENESS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


class PgRow:
    """A row read by column name (``row["id"]``) or position (``row[0]``)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: Mapping[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PgRow({tuple(self._values)!r})"


def _row_factory(cursor: Any) -> RowMaker[PgRow]:
    index = {col.name: i for i, col in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(values, index)

    return make


@functools.lru_cache(maxsize=1024)
def _pyformat(sql: str) -> str:
    """``?`` placeholders → psycopg's ``%s`` (a literal ``%`` doubled first)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg connection that takes the store's ``?`` queries."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        if parameters:
            return self.raw.execute(_pyformat(sql), parameters)
        return self.raw.execute(sql)


class PostgresSchema:
    """How migrations run on PostgreSQL: under the global lock, so one daemon of
    several starting at once migrates and the others find the work done."""

    types: Mapping[str, str] = {
        "INT": "BIGINT",
        "REAL": "DOUBLE PRECISION",
        "BLOB": "BYTEA",
        "STRICT": "",
    }
    error: type[Exception] = psycopg.Error

    def begin_migration(self, conn: Connection) -> None:
        conn.execute("BEGIN")
        conn.execute(f"SELECT pg_advisory_xact_lock({GLOBAL_LOCK}, 0)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " one INTEGER PRIMARY KEY CHECK (one = 1), version INTEGER NOT NULL)"
        )

    def version(self, conn: Connection) -> int:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return 0 if row is None else int(row[0])

    def set_version(self, conn: Connection, version: int) -> None:
        conn.execute(
            "INSERT INTO schema_version (one, version) VALUES (1, ?)"
            " ON CONFLICT (one) DO UPDATE SET version = excluded.version",
            (version,),
        )


POSTGRES = PostgresSchema()


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


def _user_key(owner: str) -> int:
    # A stable 32-bit signed key per user id; a collision only makes two users queue.
    value = zlib.crc32(owner.encode("utf-8"))
    return value - (1 << 32) if value >= 1 << 31 else value


class PostgresBackend:
    kind = "postgresql"
    schema = POSTGRES

    def __init__(self, url: str, *, lock_timeout_ms: int) -> None:
        self._url = url
        self._lock_timeout_ms = int(lock_timeout_ms)
        self.location = redact(url)
        self._conn: PgConnection | None = None
        self._closed = False
        self._failed_at = -math.inf
        self._failure = ""

    @classmethod
    def open(cls, url: str, *, lock_timeout_ms: int) -> PostgresBackend:
        """Connect to ``url`` and migrate the database (:class:`StoreUnavailable` if
        the server cannot be reached, :class:`SchemaError` if it is not usable)."""
        backend = cls(url, lock_timeout_ms=lock_timeout_ms)
        conn = backend.connection()
        try:
            migrate(conn, dialect=POSTGRES)
        except psycopg.OperationalError as exc:
            backend.close()
            raise StoreUnavailable(f"lost the connection to {backend.location}: {exc}") from exc
        except psycopg.Error as exc:
            backend.close()
            raise SchemaError(f"{backend.location} is not a usable kiln database: {exc}") from exc
        except BaseException:
            backend.close()
            raise
        return backend

    def _connect(self) -> PgConnection:
        if time.monotonic() - self._failed_at < RECONNECT_BACKOFF_S:
            raise StoreUnavailable(self._failure)
        try:
            given = conninfo_to_dict(self._url)
            liveness: dict[str, Any] = {k: v for k, v in _LIVENESS.items() if k not in given}
            raw = psycopg.connect(
                self._url,
                autocommit=True,
                row_factory=_row_factory,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="kiln",
                options=f"-c lock_timeout={self._lock_timeout_ms:d}",
                **liveness,
            )
        except psycopg.Error as exc:
            self._failed_at = time.monotonic()
            self._failure = f"cannot connect to {self.location}: {exc}".strip()
            raise StoreUnavailable(self._failure) from exc
        self._failed_at = -math.inf
        return PgConnection(raw)

    def connection(self) -> Connection:
        if self._closed:
            raise StoreError("the store is closed")
        conn = self._conn
        if conn is None or conn.raw.closed or conn.raw.broken:
            if conn is not None:
                conn.raw.close()
            self._conn = conn = self._connect()
        return conn

    for_update = " FOR UPDATE"

    def begin(self, conn: Connection, owner: str | None, *, row_locks: bool = False) -> None:
        # One round trip: BEGIN and the locks, as a simple (unprepared) query; the
        # keys are our own integers, never text from a caller. A transaction that
        # locks its rows (placement: the nodes it may choose) takes the global lock
        # shared only, so it waits for the writes that run alone and nothing else.
        if row_locks:
            locks = f"pg_advisory_xact_lock_shared({GLOBAL_LOCK}, 0)"
        elif owner is None:
            locks = f"pg_advisory_xact_lock({GLOBAL_LOCK}, 0)"
        else:
            locks = (
                f"pg_advisory_xact_lock_shared({GLOBAL_LOCK}, 0),"
                f" pg_advisory_xact_lock({USER_LOCK}, {_user_key(owner):d})"
            )
        cast(PgConnection, conn).raw.execute(f"BEGIN; SELECT {locks}", prepare=False)

    def commit(self, conn: Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Connection) -> None:
        raw = cast(PgConnection, conn).raw
        if raw.closed or raw.broken:
            return  # the server rolled it back when the connection went
        if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):  # it died just now: same as above
                raw.execute("ROLLBACK")

    def translate(self, exc: Exception) -> StoreError | None:
        if not isinstance(exc, psycopg.Error):
            return None
        text = str(exc).strip()
        match exc:
            case pg_errors.UniqueViolation():
                return NameTaken(f"already exists ({text})")
            case pg_errors.ForeignKeyViolation():
                return NotFound(f"a referenced row does not exist ({text})")
            case pg_errors.SerializationFailure() | pg_errors.DeadlockDetected():
                return RetryableConflict(f"concurrent transactions collided: {text}")
            case pg_errors.LockNotAvailable():
                return StoreError(f"the database is busy (waited for a lock): {text}")
            case psycopg.IntegrityError() | psycopg.DataError():
                return InvalidValue(text)
            case psycopg.OperationalError() | psycopg.InterfaceError():
                return StoreUnavailable(f"lost the connection to {self.location}: {text}")
        return StoreError(f"database error: {text}")

    def integrity_check(self, conn: Connection) -> list[str]:
        """PostgreSQL enforces every constraint at write time and checks pages itself;
        what is left to look at: constraints not validated, and checksum failures
        the server counted in this database."""
        problems = [
            f"constraint {r[0]} on {r[1]} is not validated"
            for r in conn.execute(
                "SELECT conname, conrelid::regclass::text FROM pg_constraint"
                " WHERE NOT convalidated AND connamespace = current_schema()::regnamespace"
            )
        ]
        row = conn.execute(
            "SELECT COALESCE(checksum_failures, 0) FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
        if row is not None and int(row[0]) > 0:
            problems.append(f"{int(row[0])} data page checksum failure(s) in this database")
        return problems

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.raw.close()
            self._conn = None
