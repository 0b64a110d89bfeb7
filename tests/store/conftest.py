from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.store import SecretBox, Store, User


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


@pytest.fixture
def store(tmp_path: Path, box: SecretBox, ticker: Ticker) -> Iterator[Store]:
    with Store.open(tmp_path / "kiln.db", secret_box=box, now=ticker) as s:
        yield s


@pytest.fixture
def alice(store: Store) -> User:
    return store.create_user("alice")[0]


@pytest.fixture
def bob(store: Store) -> User:
    return store.create_user("bob")[0]
