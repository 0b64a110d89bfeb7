"""A node's membership on a real PostgreSQL store: joining (the secret's fingerprint,
sandboxes with no node), the lease loop surviving a lost database connection, and
leaving."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import psycopg
import pytest

from kiln.cluster import ClusterError
from kiln.cluster.membership import Membership, engine_names, join, resources
from kiln.config import Config, load_config
from kiln.store import Store
from kiln.store.postgres_backend import RECONNECT_BACKOFF_S


def config(tmp_path: Path, pg_url: str, node: str, **more: object) -> Config:
    return load_config(
        None,
        {
            "data_dir": str(tmp_path / node),
            "store": pg_url,
            "cluster.node": node,
            "cluster.advertise": f"http://{node}:8080",
            "cluster.secret_file": str(tmp_path / "cluster-secret"),
            "cluster.lease_s": 0.6,
            **more,
        },
    )


def test_joining_claims_the_secret_and_takes_sandboxes_with_no_node(
    tmp_path: Path, pg_url: str
) -> None:
    with Store.open(pg_url) as store:
        user, _ = store.create_user("u")
        old = store.create_sandbox(user.id, image="minimal", engine="qemu")  # single daemon's
        a = join(store, config(tmp_path, pg_url, "a"))
        assert a.name == "a" and store.get_sandbox(old.id).node == "a"
        cfg_a = config(tmp_path, pg_url, "a")
        cfg_a.data_dir.mkdir(parents=True)
        Membership(store, cfg_a, resources(cfg_a, ["qemu"])).register()
        # A second node never takes what has no node while another is alive.
        orphan = store.create_sandbox(user.id, image="minimal", engine="qemu")
        join(store, config(tmp_path, pg_url, "b"))
        assert store.get_sandbox(orphan.id).node is None
        other = config(tmp_path, pg_url, "c", **{"cluster.secret_file": str(tmp_path / "x")})
        with pytest.raises(ClusterError, match="is not this cluster's"):
            join(store, other)
        nowhere = config(tmp_path, pg_url, "d", **{"cluster.advertise": None})
        with pytest.raises(ClusterError, match=r"cluster\.advertise"):
            join(store, nowhere)


def test_the_lease_loop_outlives_a_lost_connection(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, pg_url, "a")
    cfg.data_dir.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="kiln.cluster")

    async def scenario() -> None:
        with Store.open(pg_url) as store:
            member = Membership(store, cfg, resources(cfg, ["qemu"]))
            first = member.register()
            loop = asyncio.create_task(member.run())
            await asyncio.sleep(0.5)
            assert store.get_node("a").lease_until > first.lease_until
            # The database drops every connection of this store.
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            await asyncio.sleep(0.4 + RECONNECT_BACKOFF_S + 0.6)
            assert not loop.done()  # the loop goes on
            assert store.get_node("a").lease_until > time.time()  # and renews again
            member.stop()
            await loop
            member.leave()
            assert store.get_node("a").status(time.time()) == "lost"

    asyncio.run(scenario())
    text = caplog.text
    assert "renewing the lease of node a failed" in text
    assert "lease of node a renewed again" in text
    assert "node a left (lease ended)" in text


def test_engine_names_list_runtimes_of_engines_that_run() -> None:
    available = {"qemu": None, "docker": None, "other": "not installed"}
    assert engine_names(available, {"docker": ("runc", "runsc")}) == [
        "qemu",
        "docker",
        "docker/runc",
        "docker/runsc",
    ]
