"""The daemon on a PostgreSQL store (``store: postgresql://…``): the real ``serve()`` in a
subprocess, as in :mod:`tests.server.test_daemon`, over a database of the run's real
PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kiln.store import Store
from kiln.store.postgres_backend import RECONNECT_BACKOFF_S
from kiln.testing.postgres import PostgresServer

from .harness import LiveServer, kill_recorded_agents
from .test_daemon import MAIN, SRC, Daemon, dirs  # noqa: F401 -- dirs is a fixture


def test_sandboxes_survive_restarts_on_a_postgres_store(
    dirs: tuple[Path, Path],  # noqa: F811
    pg_url: str,
) -> None:
    data, home = dirs
    daemon = Daemon(data, home, "--store", pg_url)
    key = (data / "admin-api-key").read_text().strip()
    with daemon.client(key) as c:
        box = c.post("/sandboxes", json={"name": "box", "env": {"E": "v"}}).json()
        assert c.post("/secrets", json={"name": "S", "value": "sealed"}).status_code == 201
        assert [s["name"] for s in c.get("/sandboxes").json()] == ["box"]
    assert daemon.signal(signal.SIGTERM) == 0
    assert "store: postgresql at postgresql://" in Daemon.log_text(data)
    assert not (data / "kiln.db").exists()  # nothing went to a SQLite file

    again = Daemon(data, home, "--store", pg_url)
    try:
        with again.client(key) as c:  # the same key: the admin was not bootstrapped twice
            [listed] = c.get("/sandboxes").json()
            assert (listed["id"], listed["name"], listed["status"]) == (box["id"], "box", "running")
            out = c.post("/sandboxes/box/exec", json={"cmd": ["sh", "-c", "echo $E"]}).json()
            assert out["stdout"] == "v\n"
            assert [s["name"] for s in c.get("/secrets").json()] == ["S"]
            created = c.post("/sandboxes", json={"name": "late"})
            assert created.status_code == 201, created.text
    finally:
        assert again.signal(signal.SIGTERM) == 0
    with Store.open(pg_url) as store:
        assert store.integrity_check() == []
        assert store.count_sandboxes() == 2


def test_unreachable_postgres_store_stops_the_start_with_a_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln.cli",
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
            "--store",
            "postgresql://kiln:pw@127.0.0.1:1/kiln",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SRC), HOME=str(tmp_path)),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "kiln: error: cannot connect to postgresql://kiln@127.0.0.1:1/kiln" in proc.stderr
    assert "pw@" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_api_answers_503_while_postgres_is_down_then_recovers(tmp_path: Path) -> None:
    with PostgresServer.start() as pg:
        live = LiveServer(tmp_path, store_target=pg.create_database()).start()
        try:
            _user, key = live.store.create_user("alice")
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=live.url, headers=headers) as c:
                assert c.post("/sandboxes", json={"name": "one"}).status_code == 201
                pg.pause()
                down = c.get("/sandboxes")
                assert down.status_code == 503
                assert "store unavailable" in down.json()["error"]
                assert c.get("/sandboxes").status_code == 503  # still down: same answer
                pg.resume()
                time.sleep(RECONNECT_BACKOFF_S)  # failed connects are not retried sooner
                assert [s["name"] for s in c.get("/sandboxes").json()] == ["one"]
                assert c.post("/sandboxes", json={"name": "two"}).status_code == 201
        finally:
            live.stop()


def test_a_daemon_with_another_secret_key_is_refused_on_a_shared_store(
    tmp_path: Path, pg_url: str
) -> None:
    first_data, home = tmp_path / "first", tmp_path / "home"
    home.mkdir()
    first = Daemon(first_data, home, "--store", pg_url)
    key = (first_data / "admin-api-key").read_text().strip()
    with first.client(key) as c:
        assert c.post("/secrets", json={"name": "S", "value": "sealed"}).status_code == 201
    assert first.signal(signal.SIGTERM) == 0

    second_data = tmp_path / "second"
    refused = subprocess.run(
        [sys.executable, str(MAIN), str(second_data), "--store", pg_url],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SRC), HOME=str(home)),
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "is not the one this store's secrets are sealed with" in refused.stderr

    # With the first daemon's key file it starts, and opens what the first one sealed.
    shutil.copy2(first_data / "secret.key", second_data / "secret.key")
    # A node of the same cluster needs its secret too (refused otherwise: see
    # test_cluster_membership).
    shutil.copy2(first_data / "cluster-secret", second_data / "cluster-secret")
    second = Daemon(second_data, home, "--store", pg_url)
    try:
        with second.client(key) as c:
            made = c.post("/sandboxes", json={"name": "sb", "secrets": ["S"]})
            assert made.status_code == 201, made.text
            out = c.post("/sandboxes/sb/exec", json={"cmd": ["sh", "-c", "echo $S"]}).json()
            assert out["stdout"] == "sealed\n"
    finally:
        assert second.signal(signal.SIGTERM) == 0
        kill_recorded_agents(second_data / "engine")


def test_a_replaced_key_only_warns_on_a_private_store(dirs: tuple[Path, Path]) -> None:  # noqa: F811
    data, home = dirs
    first = Daemon(data, home)
    key = (data / "admin-api-key").read_text().strip()
    with first.client(key) as c:
        assert c.post("/secrets", json={"name": "S", "value": "sealed"}).status_code == 201
    assert first.signal(signal.SIGTERM) == 0
    (data / "secret.key").unlink()  # lost: the next start makes a new one
    second = Daemon(data, home)
    try:
        with second.client(key) as c:
            assert [s["name"] for s in c.get("/secrets").json()] == ["S"]
    finally:
        assert second.signal(signal.SIGTERM) == 0
    assert "stored secrets cannot be read" in Daemon.log_text(data)
