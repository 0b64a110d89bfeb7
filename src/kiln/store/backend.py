"""The seam between :class:`~kiln.store.Store` and its database engine.

The store writes every query once, in the SQL both engines accept, with ``?``
placeholders, and reads rows by column name or position. What differs lives
behind :class:`Backend`: opening (and, for a server, re-opening) the
connection, how a write transaction begins and what it locks, translating the
driver's exceptions into the store's, and what an integrity check means.
:mod:`.sqlite_backend` and :mod:`.postgres_backend` implement it; neither
inherits from the other. :mod:`.schema` has the matching seam for migrations
(:class:`~kiln.store.schema.SchemaDialect`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .errors import StoreError

if TYPE_CHECKING:
    from .schema import SchemaDialect

#: URL schemes that select PostgreSQL; anything else given as a store is a SQLite path.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str) -> bool:
    return target.startswith(POSTGRES_SCHEMES)


class Cursor(Protocol):
    """What the store uses of a cursor (``sqlite3.Cursor`` and psycopg's alike).

    Rows answer ``row["column"]`` and ``row[0]``.
    """

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the store uses of a connection: one method, SQL with ``?`` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...


class Backend(Protocol):
    """One database engine under the store. Called only with the store's lock held."""

    #: ``"sqlite"`` or ``"postgresql"``.
    kind: str
    #: Where the data is, safe to log: a file path, or a URL without its password.
    location: str

    @property
    def schema(self) -> SchemaDialect:
        """How migrations and the schema version work on this engine."""
        ...

    def connection(self) -> Connection:
        """The open connection, re-opened first if it was lost (:class:`StoreError`
        when that fails)."""
        ...

    def begin(self, conn: Connection, owner: str | None, *, row_locks: bool = False) -> None:
        """Start a write transaction. ``owner``: the user whose rows alone the
        transaction's checks read (quotas, names), or ``None`` when its invariants
        span users; a backend may let writes for different owners run at once.
        ``row_locks``: the transaction locks the rows it checks itself (``SELECT …
        FOR UPDATE``, see :attr:`for_update`), so it needs no lock of its own."""
        ...

    #: What makes a ``SELECT`` lock the rows it reads until the transaction ends
    #: (``""`` where a write transaction already excludes every other writer).
    for_update: str

    def commit(self, conn: Connection) -> None: ...

    def rollback(self, conn: Connection) -> None:
        """Roll back the open transaction, if there is one; never raises."""
        ...

    def translate(self, exc: Exception) -> StoreError | None:
        """The store's error for a driver exception; ``None`` if ``exc`` is not one."""
        ...

    def integrity_check(self, conn: Connection) -> list[str]:
        """Problems found in the stored data; empty when healthy."""
        ...

    def close(self) -> None: ...


class RetryableConflict(StoreError):
    """Two transactions collided (deadlock, serialization failure): the whole call may
    be run again. The store retries a few times before letting this escape."""
