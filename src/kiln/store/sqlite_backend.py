"""The embedded default: one SQLite file, one connection.

Autocommit mode; every write transaction is ``BEGIN IMMEDIATE … COMMIT``, which
takes the database's single write lock at once, so the checks a transaction
makes (quotas, names) still hold when it commits, and a row is either fully
written or absent after a crash. WAL journaling with ``synchronous=NORMAL``: a
committed transaction survives the daemon being killed (it is in the WAL file
the moment ``COMMIT`` returns); only an OS crash or power loss can lose the last
few commits, never corrupt the database.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import cast

from .backend import Connection
from .errors import InvalidValue, NameTaken, NotFound, SchemaError, StoreError
from .schema import SQLITE, migrate


class SqliteBackend:
    kind = "sqlite"
    schema = SQLITE

    def __init__(self, conn: sqlite3.Connection, location: str) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.location = location

    @classmethod
    def open(cls, path: str, *, busy_timeout_ms: int) -> SqliteBackend:
        """Open (creating if needed) and migrate the database file at ``path``.

        A new file is made readable by its owner only: it holds key hashes and
        encrypted secrets. ``":memory:"`` works for throwaway stores.
        """
        in_memory = path == ":memory:"
        try:
            if not in_memory and not Path(path).exists():
                # An empty file is a valid empty database; SQLite gives its -wal and
                # -shm files the same mode.
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms):d}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if not in_memory and str(mode).lower() != "wal":
                raise StoreError(f"cannot switch {path} to WAL journaling (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn, dialect=SQLITE)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise SchemaError(f"{path} is not a usable kiln database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def connection(self) -> Connection:
        if self._conn is None:
            raise StoreError("the store is closed")
        return cast(Connection, self._conn)

    for_update = ""  # BEGIN IMMEDIATE already admits one writer at a time

    def begin(self, conn: Connection, owner: str | None, *, row_locks: bool = False) -> None:
        # One writer at a time whatever the owner: SQLite has a single write lock.
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: Connection) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def translate(self, exc: Exception) -> StoreError | None:
        if isinstance(exc, sqlite3.IntegrityError):
            text = str(exc)
            if "UNIQUE" in text:
                return NameTaken(f"already exists ({text})")
            if "FOREIGN KEY" in text:
                return NotFound(f"a referenced row does not exist ({text})")
            return InvalidValue(text)
        if isinstance(exc, sqlite3.Error):
            return StoreError(f"database error: {exc}")
        return None

    def integrity_check(self, conn: Connection) -> list[str]:
        """SQLite's integrity and foreign-key checks."""
        problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        if problems == ["ok"]:
            problems = []
        problems += [
            f"foreign key violation in {r[0]} row {r[1]} → {r[2]}"
            for r in conn.execute("PRAGMA foreign_key_check")
        ]
        return problems

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
