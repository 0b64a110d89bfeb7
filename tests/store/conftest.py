"""The store suite runs on both backends: every test taking ``store`` runs once on a
SQLite file and once on a database of a real PostgreSQL server (``pg_url``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kiln.store import SecretBox, Store, User

#: Runs one statement (``?`` placeholders) on a second connection, committed; returns rows.
RawSql = Callable[..., list[tuple[Any, ...]]]


class Ticker:
    """A store clock: every reading is one second after the previous one."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


@pytest.fixture
def box(tmp_path: Path) -> SecretBox:
    return SecretBox(tmp_path / "keys" / "secret.key")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store lives: a SQLite file path or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "kiln.db")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(store_target: str, box: SecretBox, ticker: Ticker) -> Iterator[Store]:
    with Store.open(store_target, secret_box=box, now=ticker) as s:
        yield s


@pytest.fixture
def sqlite_store(tmp_path: Path, box: SecretBox, ticker: Ticker) -> Iterator[Store]:
    """For what only SQLite has (the file on disk, STRICT tables)."""
    with Store.open(tmp_path / "kiln.db", secret_box=box, now=ticker) as s:
        yield s


@pytest.fixture
def raw_sql(store: Store, store_target: str) -> RawSql:
    """Reach past the store into its database (to damage or inspect rows)."""

    def run(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if store.backend == "sqlite":
            conn = sqlite3.connect(store_target)
            try:
                rows = conn.execute(sql, tuple(params)).fetchall()
                conn.commit()
            finally:
                conn.close()
            return rows
        with psycopg.connect(store_target, autocommit=True) as pg:
            cur = pg.execute(sql.replace("?", "%s"), tuple(params))
            return cur.fetchall() if cur.description else []

    return run


@pytest.fixture
def alice(store: Store) -> User:
    return store.create_user("alice")[0]


@pytest.fixture
def bob(store: Store) -> User:
    return store.create_user("bob")[0]
