"""Any node answers for any sandbox: two daemons on one PostgreSQL store, real HTTP.

Node ``a`` and node ``b`` are two live servers (test-mode engine with real
agents) on one database, each a cluster node with the same secret. Sandboxes
are made on ``b``; every request here goes to ``a``, which relays it to ``b``
(the answer's ``x-kiln-node`` says who served it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

from kiln.cluster import PEER_HEADER, ClusterNode, PeerAuth
from kiln.store import Store

from .harness import LiveServer
from .upstream import Upstream

NDJSON = {"Accept": "application/x-ndjson"}
SECRET = secrets.token_hex(32).encode()


@dataclass
class Cluster:
    a: LiveServer
    b: LiveServer
    key: str  # a user's API key (the store is shared: valid on both nodes)
    other_key: str

    def client(self, node: LiveServer, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.Client(base_url=node.url, headers=headers, timeout=30)

    def sandbox_on_b(self, name: str) -> dict[str, Any]:
        """A sandbox made through ``b``'s API and kept there (a create that another
        node signed is never placed elsewhere)."""
        with self.client(self.b) as http:
            r = http.post("/sandboxes", json={"name": name}, headers=placed_by_a())
        assert r.status_code == 201, r.text
        sb: dict[str, Any] = r.json()
        assert sb["node"] == "b"
        assert self.a.store.get_sandbox(sb["id"]).node == "b"
        return sb


def placed_by_a() -> dict[str, str]:
    """The peer header of a create node a placed on the node it is sent to."""
    return {PEER_HEADER: PeerAuth("a", SECRET).sign("POST", "/sandboxes")}


def join(server: LiveServer, name: str, *, lease_s: float = 3600.0) -> None:
    """Make ``server`` node ``name`` of the cluster (registered, with a lease)."""
    server.services.cluster = ClusterNode(server.store, PeerAuth(name, SECRET))
    server.store.register_node(
        name,
        address=server.url,
        engines=("fake",),
        cpus=4,
        memory_mb=8192,
        disk_mb=10_000,
        lease_s=lease_s,
    )


@pytest.fixture(scope="module")
def module_pg(postgres_server: Any) -> Iterator[str]:
    with postgres_server.database() as url:
        yield url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, module_pg: str) -> Iterator[Cluster]:
    a = LiveServer(tmp_path_factory.mktemp("node-a"), store_target=module_pg).start()
    b = LiveServer(tmp_path_factory.mktemp("node-b"), store_target=module_pg).start()
    try:
        join(a, "a")
        join(b, "b")
        _, key = a.store.create_user(f"u{secrets.token_hex(4)}")
        _, other = a.store.create_user(f"u{secrets.token_hex(4)}")
        yield Cluster(a, b, key, other)
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream().start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def sb(cluster: Cluster) -> dict[str, Any]:
    return cluster.sandbox_on_b("far")


# --- the sandbox itself -------------------------------------------------------------


def test_get_by_id_and_name_and_the_list_through_another_node(
    cluster: Cluster, sb: dict[str, Any]
) -> None:
    with cluster.client(cluster.a) as http:
        by_id = http.get(f"/sandboxes/{sb['id']}")
        by_name = http.get("/sandboxes/far")
        listed = http.get("/sandboxes")
    assert by_id.status_code == 200, by_id.text
    assert by_id.headers["x-kiln-node"] == "b"
    assert by_name.headers["x-kiln-node"] == "b"
    assert by_id.json()["id"] == by_name.json()["id"] == sb["id"]
    assert by_id.json()["status"] == "running"
    # The list is served by the node asked, from the shared store.
    assert listed.status_code == 200
    assert "x-kiln-node" not in listed.headers
    assert sb["id"] in [s["id"] for s in listed.json()]


def test_someone_elses_and_unknown_sandboxes_stay_404(cluster: Cluster, sb: dict[str, Any]) -> None:
    with cluster.client(cluster.a, cluster.other_key) as http:
        assert http.get(f"/sandboxes/{sb['id']}").status_code == 404  # relayed, refused by b
        assert http.get("/sandboxes/far").status_code == 404  # no such name for this user
        assert http.get("/sandboxes/sb-000000000000").status_code == 404
    with httpx.Client(base_url=cluster.a.url) as anonymous:
        r = anonymous.get(f"/sandboxes/{sb['id']}")
    assert r.status_code == 401
    assert r.headers["x-kiln-node"] == "b"  # b checked the (missing) key itself


def test_exec_buffered(cluster: Cluster, sb: dict[str, Any]) -> None:
    with cluster.client(cluster.a) as http:
        r = http.post(f"/sandboxes/{sb['id']}/exec", json={"cmd": ["sh", "-c", "echo $((6*7))"]})
    assert r.status_code == 200, r.text
    assert r.json()["stdout"] == "42\n"
    assert r.json()["exit_code"] == 0


def test_exec_stream_lines_arrive_as_produced(cluster: Cluster, sb: dict[str, Any]) -> None:
    script = "echo first; sleep 1.5; echo second"
    arrivals: list[tuple[float, dict[str, Any]]] = []
    with (
        cluster.client(cluster.a) as http,
        http.stream(
            "POST", "/sandboxes/far/exec", json={"cmd": ["sh", "-c", script]}, headers=NDJSON
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        start = time.monotonic()
        for line in r.iter_lines():
            if line:
                arrivals.append((time.monotonic() - start, json.loads(line)))
    events = [e for _, e in arrivals]
    first = next(t for t, e in arrivals if e.get("data") == "first\n")
    second = next(t for t, e in arrivals if e.get("data") == "second\n")
    assert second - first >= 1.0, arrivals  # not held back until the end
    assert events[-1]["type"] == "exit"
    assert events[-1]["exit_code"] == 0


def test_processes_sessions_and_ports_through_another_node(
    cluster: Cluster, sb: dict[str, Any]
) -> None:
    with cluster.client(cluster.a) as http:
        started = http.post("/sandboxes/far/processes", json={"cmd": ["sleep", "30"]})
        assert started.status_code in (200, 201), started.text
        pid = started.json()["pid"]
        listed = http.get("/sandboxes/far/processes")
        assert pid in [p["pid"] for p in listed.json()]
        killed = http.post(f"/sandboxes/far/processes/{pid}/signal", json={"signal": "KILL"})
        assert killed.status_code in (200, 202, 204), killed.text
        for path in ("/sandboxes/far/sessions", "/sandboxes/far/ports"):
            r = http.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["x-kiln-node"] == "b"


def test_an_oversized_body_is_refused_by_the_owning_node(
    cluster: Cluster, sb: dict[str, Any]
) -> None:
    """b refuses it (413) without reading it; the caller at a gets that answer."""
    body = b'{"cmd": ["true"], "pad": "' + b"x" * (5 << 20) + b'"}'
    with cluster.client(cluster.b) as http:
        r = http.post(
            "/sandboxes/far/exec", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
    with cluster.client(cluster.a) as http:
        r = http.post(
            "/sandboxes/far/exec", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
        assert r.headers["x-kiln-node"] == "b"
        assert http.get("/sandboxes/far").status_code == 200  # the next request is fine


def test_files_upload_and_download_of_a_few_mib(cluster: Cluster, sb: dict[str, Any]) -> None:
    blob = os.urandom(5 << 20)
    with cluster.client(cluster.a) as http:
        r = http.put(
            "/sandboxes/far/files",
            params={"path": "/tmp/blob"},
            content=blob,
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code in (200, 201, 204), r.text
        with http.stream("GET", "/sandboxes/far/files", params={"path": "/tmp/blob"}) as got:
            assert got.status_code == 200
            assert got.headers["x-kiln-node"] == "b"
            digest = hashlib.sha256()
            for chunk in got.iter_bytes():
                digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()
    # The file is on b's side of the sandbox.
    with cluster.client(cluster.b) as http:
        r = http.post("/sandboxes/far/exec", json={"cmd": ["wc", "-c", "/tmp/blob"]})
    assert r.json()["stdout"].split()[0] == str(len(blob))


async def test_websocket_shell(cluster: Cluster, sb: dict[str, Any]) -> None:
    url = f"{cluster.a.ws_url}/sandboxes/far/ws?token={cluster.key}&cmd=/bin/sh"
    async with connect(url) as ws:
        await ws.send(b"echo relayed-$((6*7))\n")
        seen = b""
        async with asyncio.timeout(10):
            while b"relayed-42" not in seen:
                message = await ws.recv()
                assert isinstance(message, bytes)
                seen += message


async def test_websocket_shell_refusal_is_relayed(cluster: Cluster, sb: dict[str, Any]) -> None:
    url = f"{cluster.a.ws_url}/sandboxes/{sb['id']}/ws?token=kiln_wrong"
    with pytest.raises(InvalidStatus) as info:
        async with connect(url):
            pass
    assert info.value.response.status_code == 401


# --- the reverse proxy and published ports ------------------------------------------


def test_proxy_http_and_websocket(cluster: Cluster, sb: dict[str, Any], upstream: Upstream) -> None:
    prefix = f"/sandboxes/far/proxy/{upstream.port}"
    with cluster.client(cluster.a) as http:
        r = http.get(f"{prefix}/echo/x?y=1")
    assert r.status_code == 200, r.text
    assert r.headers["x-kiln-node"] == "b"
    data = r.json()
    assert (data["raw_path"], data["query"]) == ("/echo/x", "y=1")
    assert PEER_HEADER not in dict(data["headers"])  # b's proxy passes no peer header on
    ws_url = f"{cluster.a.ws_url}{prefix}/ws?token={cluster.key}"
    with sync_connect(ws_url, subprotocols=["chat"], max_size=None) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        hello = json.loads(ws.recv())
        assert hello["path"] == "/ws"
        ws.send("hello")
        assert ws.recv() == "hello"
        big = os.urandom(1 << 20)
        ws.send(big)
        assert ws.recv() == big


def test_proxy_streams_a_chunked_upload_both_hops(
    cluster: Cluster, sb: dict[str, Any], upstream: Upstream
) -> None:
    """A body without a length goes on chunked, through a and b, never held whole."""
    payload = os.urandom(10 << 20)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 1 << 16):
            yield payload[i : i + (1 << 16)]

    with cluster.client(cluster.a) as http:
        r = http.post(f"/sandboxes/far/proxy/{upstream.port}/upload", content=chunks())
    assert r.status_code == 200, r.text
    assert r.headers["x-kiln-node"] == "b"
    assert (r.json()["sha256"], r.json()["size"]) == (
        hashlib.sha256(payload).hexdigest(),
        len(payload),
    )


def test_published_url_through_another_node(
    cluster: Cluster, sb: dict[str, Any], upstream: Upstream
) -> None:
    with cluster.client(cluster.a) as http:
        r = http.post("/sandboxes/far/publish", json={"port": upstream.port, "alias": "farpub"})
    assert r.status_code == 201, r.text
    port = cluster.a.url.rsplit(":", 1)[1]
    host = f"farpub.localhost:{port}"
    r = httpx.get(f"{cluster.a.url}/echo/pub", headers={"Host": host}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-kiln-node"] == "b"
    assert dict(r.json()["headers"])["host"] == host  # the original Host went on
    # A WebSocket to the published port, by the same Host, through a.
    sock = socket.create_connection(("127.0.0.1", int(port)))
    with sync_connect(f"ws://{host}/ws", sock=sock) as ws:
        hello = json.loads(ws.recv())
        assert hello["path"] == "/ws"
        ws.send("published")
        assert ws.recv() == "published"


# --- peers ---------------------------------------------------------------------------


def test_forged_or_stale_peer_signature_is_401(cluster: Cluster, sb: dict[str, Any]) -> None:
    path = f"/sandboxes/{sb['id']}"
    forged = PeerAuth("a", secrets.token_hex(32).encode()).sign("GET", path)
    stale = PeerAuth("a", SECRET).sign("GET", path, now=time.time() - 3600)
    other_path = PeerAuth("a", SECRET).sign("GET", "/sandboxes")
    with cluster.client(cluster.b) as http:
        for value in (forged, stale, other_path, "garbage"):
            r = http.get(path, headers={PEER_HEADER: value})
            assert r.status_code == 401, (value, r.text)
            assert PEER_HEADER in r.json()["error"]
        good = http.get(path, headers={PEER_HEADER: PeerAuth("a", SECRET).sign("GET", path)})
    assert good.status_code == 200


def test_a_signature_holds_over_the_raw_or_the_decoded_path(
    cluster: Cluster, sb: dict[str, Any]
) -> None:
    """The relay signs the path as sent; a placed create signs the decoded one."""
    peer = PeerAuth("a", SECRET)
    with cluster.client(cluster.b) as http:
        for signed in ("/sandboxes/f%61r", "/sandboxes/far"):
            r = http.get("/sandboxes/f%61r", headers={PEER_HEADER: peer.sign("GET", signed)})
            assert r.status_code == 200, (signed, r.text)
        r = http.get("/sandboxes/f%61r", headers={PEER_HEADER: peer.sign("GET", "/x")})
        assert r.status_code == 401


def test_peer_signed_request_to_the_wrong_node_is_421(cluster: Cluster, sb: dict[str, Any]) -> None:
    path = f"/sandboxes/{sb['id']}/exec"
    signed = PeerAuth("b", SECRET).sign("POST", path)
    with cluster.client(cluster.a) as http:
        r = http.post(path, json={"cmd": ["true"]}, headers={PEER_HEADER: signed})
    assert r.status_code == 421
    assert "lives on node 'b'" in r.json()["error"]
    assert "not relayed again" in r.json()["error"]


def test_envd_token_from_one_node_holds_on_another(cluster: Cluster, sb: dict[str, Any]) -> None:
    assert cluster.a.services.envd_tokens.issue(sb["id"]) == cluster.b.services.envd_tokens.issue(
        sb["id"]
    )
    with httpx.Client(base_url=cluster.a.url, headers={"X-API-Key": cluster.key}) as http:
        detail = http.get(f"/e2b/sandboxes/{sb['id']}")
    assert detail.status_code == 200, detail.text
    token = detail.json()["envdAccessToken"]
    assert detail.headers["x-kiln-node"] == "b"
    with cluster.client(cluster.a) as http:
        http.put("/sandboxes/far/files", params={"path": "/tmp/envd-check"}, content=b"hi")
    # The file route of envd, through a (relayed to b) and on b directly.
    for node in (cluster.a, cluster.b):
        r = httpx.get(
            f"{node.url}/e2b/envd/files",
            params={"path": "/tmp/envd-check", "username": "root"},
            headers={"E2b-Sandbox-Id": sb["id"], "X-Access-Token": token},
        )
        assert r.status_code == 200, r.text
        assert r.content == b"hi"
    bad = httpx.get(
        f"{cluster.a.url}/e2b/envd/files",
        params={"path": "/tmp/envd-check", "username": "root"},
        headers={"E2b-Sandbox-Id": sb["id"], "X-Access-Token": "wrong"},
    )
    assert bad.status_code == 401


# --- the home node away ----------------------------------------------------------------


def test_home_node_lost_is_503_and_unreachable_is_502(
    tmp_path: Path, cluster: Cluster, module_pg: str
) -> None:
    c = LiveServer(tmp_path / "node-c", store_target=module_pg).start()
    try:
        join(c, "c")
        with httpx.Client(base_url=c.url, headers={"Authorization": f"Bearer {cluster.key}"}) as h:
            r = h.post("/sandboxes", json={"name": "on-c"}, headers=placed_by_a())
        assert r.status_code == 201, r.text
        sb_id = r.json()["id"]
        assert r.json()["node"] == "c"
    finally:
        c.stop()
    time.sleep(1.1)  # past a's cache of node rows
    with cluster.client(cluster.a) as http:
        r = http.get(f"/sandboxes/{sb_id}")
        assert r.status_code == 502, r.text
        assert "node 'c'" in r.json()["error"]
        assert "cannot be reached" in r.json()["error"]
        cluster.a.store.renew_node("c", lease_s=-1)  # its lease ran out
        time.sleep(1.1)
        r = http.get(f"/sandboxes/{sb_id}")
        assert r.status_code == 503, r.text
        assert (
            f"sandbox {sb_id} lives on node 'c', which is lost (no lease since"
            in (r.json()["error"])
        )
    # A WebSocket (the shell) is refused with the same answer.
    url = f"{cluster.a.ws_url}/sandboxes/{sb_id}/ws?token={cluster.key}"
    with pytest.raises(InvalidStatus) as info, sync_connect(url):
        pass
    assert info.value.response.status_code == 503
    assert b"which is lost" in (info.value.response.body or b"")


def test_client_disconnect_ends_the_relayed_stream(cluster: Cluster, sb: dict[str, Any]) -> None:
    """A streamed exec cut off by its client at node a ends on node b too."""
    marker = f"/tmp/alive-{secrets.token_hex(4)}"
    script = f"while true; do touch {marker}; sleep 0.2; done"
    with (
        cluster.client(cluster.a) as http,
        http.stream(
            "POST", "/sandboxes/far/exec", json={"cmd": ["sh", "-c", script]}, headers=NDJSON
        ) as r,
    ):
        assert r.status_code == 200
    time.sleep(1.0)
    with cluster.client(cluster.b) as http:
        r1 = http.post("/sandboxes/far/exec", json={"cmd": ["sh", "-c", f"rm -f {marker}"]})
        time.sleep(1.0)
        r2 = http.post("/sandboxes/far/exec", json={"cmd": ["test", "-e", marker]})
    assert r1.status_code == 200
    assert r2.json()["exit_code"] != 0  # nothing touches it any more


def test_delete_through_another_node(cluster: Cluster) -> None:
    cluster.sandbox_on_b("doomed")
    with cluster.client(cluster.a) as http:
        r = http.delete("/sandboxes/doomed")
        assert r.status_code in (200, 204), r.text
        assert r.headers["x-kiln-node"] == "b"
        assert http.get("/sandboxes/doomed").status_code == 404


def test_single_daemon_is_untouched(tmp_path: Path) -> None:
    """On SQLite (no cluster) the front passes everything through, peer header or not."""
    solo = LiveServer(tmp_path / "solo").start()
    try:
        store: Store = solo.store
        _, key = store.create_user("solo")
        with httpx.Client(
            base_url=solo.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as http:
            r = http.post("/sandboxes", json={"name": "here"})
            assert r.status_code == 201
            r = http.get("/sandboxes/here", headers={PEER_HEADER: "garbage"})
        assert r.status_code == 200
        assert "x-kiln-node" not in r.headers
    finally:
        solo.stop()


# --- E2B's SDK -------------------------------------------------------------------------


def test_e2b_sdk_through_another_node(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unmodified ``e2b`` SDK pointed at node a, for a sandbox made on node b."""

    def use(node: LiveServer) -> None:
        monkeypatch.setenv("E2B_API_URL", node.url + "/e2b")
        monkeypatch.setenv("E2B_SANDBOX_URL", node.url + "/e2b/envd")
        monkeypatch.setenv("E2B_API_KEY", cluster.key)

    use(cluster.b)
    made = Sandbox.create(timeout=300)
    try:
        assert cluster.b.store.get_sandbox(made.sandbox_id).node == "b"
        use(cluster.a)
        sandbox = Sandbox.connect(made.sandbox_id)
        result = sandbox.commands.run("echo from-$((6*7))")
        assert (result.exit_code, result.stdout) == (0, "from-42\n")
        # The test-mode agent has no account "user" (a VM's guest makes it at boot).
        sandbox.files.write("/tmp/e2b-relay.txt", "through a", user="root")
        assert sandbox.files.read("/tmp/e2b-relay.txt", user="root") == "through a"
        # All of it ran on b: a's engine never heard of the sandbox.
        assert made.sandbox_id in cluster.b.engine.agents
        assert made.sandbox_id not in cluster.a.engine.boxes
    finally:
        use(cluster.a)
        assert Sandbox.kill(made.sandbox_id)
