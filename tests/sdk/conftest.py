"""A daemon for the whole SDK test session, and a client and a fresh sandbox per test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress

import pytest

from kiln.sdk import AsyncKiln, Kiln, NotFound, Sandbox

from .daemon import Daemon, running_daemon


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("sdk-daemon")) as d:
        yield d


@pytest.fixture
def kiln(daemon: Daemon) -> Iterator[Kiln]:
    with Kiln(daemon.url, daemon.token) as k:
        yield k


@pytest.fixture
async def akiln(daemon: Daemon) -> AsyncIterator[AsyncKiln]:
    async with AsyncKiln(daemon.url, daemon.token) as k:
        yield k


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def sb(kiln: Kiln) -> Iterator[Sandbox]:
    sandbox = kiln.sandboxes.create(name=unique("sb"))
    yield sandbox
    with suppress(NotFound):
        kiln.sandboxes.delete(sandbox.id)
