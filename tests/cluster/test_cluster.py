"""Three real ``kiln serve`` nodes in three network namespaces on one real PostgreSQL
(:mod:`kiln.testing.cluster`): the wiring every cluster test stands on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.testing.cluster import HOST_IP, Cluster
from kiln.testing.postgres import PostgresNotInstalled, find_bindir

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    for tool in ("qemu-system-x86_64", "ip", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        find_bindir()
    except PostgresNotInstalled as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def _get_from(netns: str, url: str) -> int:
    """The status of a GET of ``url`` made from inside namespace ``netns``."""
    code = f"import httpx; print(httpx.get({url!r}, timeout=10).status_code)"
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout.strip())


def test_every_node_reaches_every_other_and_the_store(cluster: Cluster) -> None:
    nodes = list(cluster.each())
    assert [n.name for n in nodes] == ["a", "b", "c"]
    for here in nodes:
        for there in nodes:
            assert _get_from(here.netns, f"{there.url}/health") == 200
    assert HOST_IP in cluster.store_url
    # Nothing of the test's namespace leaks into a node's: each has its own links.
    links = subprocess.run(
        ["ip", "-n", nodes[0].netns, "-o", "link", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert cluster.bridge not in links


def test_a_sandbox_made_on_one_node_is_in_the_shared_store_and_directory(
    cluster: Cluster,
) -> None:
    a, b, c = cluster.nodes["a"], cluster.nodes["b"], cluster.nodes["c"]
    with a.client(cluster.admin_token) as api:
        made = api.post("/sandboxes", json={"name": "on-a", "memory_mb": 256})
        assert made.status_code == 201, made.text
        box = made.json()
        out = api.post(
            "/sandboxes/on-a/exec",
            json={"cmd": ["sh", "-c", "echo hi > /home/sandbox/f; hostname"]},
        )
        assert out.status_code == 200, out.text
        assert out.json()["stdout"] == "on-a\n"
    for node in (b, c):  # one store: every node knows it by name and id
        with node.client(cluster.admin_token) as api:
            assert api.get("/sandboxes/on-a").json()["id"] == box["id"]
            assert box["id"] in {s["id"] for s in api.get("/sandboxes").json()}
    # Its files are in the shared directory, under its node's name.
    root: Path = cluster.shared_dir / "nodes" / "a" / "sandboxes" / box["id"]
    assert (root / "sandbox.json").is_file() and (root / "rootfs.qcow2").is_file()
    assert any((cluster.shared_dir / "bases").iterdir())
    assert not (a.data_dir / "qemu" / "sandboxes" / box["id"]).exists()
