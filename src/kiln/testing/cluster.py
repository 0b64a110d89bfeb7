"""A throwaway kiln cluster for tests and benchmarks: a real PostgreSQL and real
``kiln serve`` daemons, each in a network namespace of its own, wired together.

Inside the caller's network namespace (a test's: run under ``unshare --net``, or
anywhere the caller may add links) :meth:`Cluster.start` makes a bridge with
:data:`HOST_IP` (the test side, where PostgreSQL also listens), and per node a
named namespace ``kc<tag><node>`` joined to the bridge by a veth (the node's
``eth0``, ``10.214.0.<11+i>``). Each node runs ``kiln serve`` in its namespace,
listening on its address, with one PostgreSQL store URL, one ``secret_key`` file,
one cluster secret file and one ``shared_dir`` for all, a short lease, no warm
pool; its sandbox network is its namespace's own (the same subnet on every node,
as on separate hosts). :meth:`Cluster.stop` (also on ``with`` exit, even after a
failure) stops the daemons, kills every QEMU under the cluster's directory,
deletes the namespaces and the bridge, and stops PostgreSQL.

:meth:`ClusterNode.lose` is a node's host dying: its daemon and its machines
SIGKILLed at once; nothing renews its lease any more.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import httpx

from kiln.cluster import PEER_HEADER, PeerAuth

from .postgres import PostgresServer

HOST_IP: Final = "10.214.0.1"
SUBNET: Final = "10.214.0.0/24"
PORT: Final = 8080
#: Until a node's daemon answers /health (its first start may build an image).
START_TIMEOUT_S: Final = 180.0
STOP_TIMEOUT_S: Final = 20.0


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


def _quietly(*argv: str) -> None:
    subprocess.run(argv, capture_output=True, timeout=30, check=False)


def _pids_with(marker: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out


def exited(pid: int) -> bool:
    """Gone, or a zombie with no thread left: its files (and their locks) closed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X"):
        return False
    # A zombie leader whose other threads still exit holds the files open.
    try:
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker``, and wait until they
    have exited (an exiting process loses its command line before its files)."""
    deadline = time.monotonic() + 10
    killed: set[int] = set()
    while pids := [p for p in _pids_with(marker) if p != os.getpid()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {marker} do not die: {pids}")
        time.sleep(0.05)
    while not all(exited(pid) for pid in killed):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {marker} do not exit: {sorted(killed)}")
        time.sleep(0.02)


@dataclass
class ClusterNode:
    """One node: its namespace, address, directory and daemon."""

    name: str
    netns: str
    ip: str
    root: Path
    shared_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{PORT}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def client(self, token: str, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def lose(self) -> None:
        """The node's host dies: daemon and machines SIGKILLed, nothing shuts down."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _kill_all(f"{self.shared_dir}/nodes/{self.name}/")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Cluster:
    """``names``: the nodes; ``config``: settings every node's config file gets on
    top of the harness's own (e.g. ``{"engine": "qemu"}``)."""

    root: Path
    names: Sequence[str] = ("a", "b", "c")
    lease_s: float = 3.0
    config: Mapping[str, Any] = field(default_factory=dict)
    src: Path = field(default_factory=lambda: Path(__file__).resolve().parents[2])
    nodes: dict[str, ClusterNode] = field(default_factory=dict)
    postgres: PostgresServer | None = None
    store_url: str = ""
    admin_token: str = ""
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    _links: list[str] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)

    @property
    def shared_dir(self) -> Path:
        return self.root / "shared"

    @property
    def bridge(self) -> str:
        return f"kc{self.tag}br"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.shared_dir.mkdir(exist_ok=True)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        _run("ip", "link", "set", "lo", "up")
        self.postgres = PostgresServer.start(host=HOST_IP, allow=SUBNET)
        self.store_url = self.postgres.create_database().replace("127.0.0.1", HOST_IP, 1)
        PeerAuth.load("harness", self.root / "cluster.secret")  # made once, before any node
        for i, name in enumerate(self.names):
            self.nodes[name] = self._make_node(name, f"10.214.0.{11 + i}")
        first, *rest = self.nodes.values()
        # The first node bootstraps the admin and the secret key; the others find them.
        self._launch(first)
        self._wait_healthy([first])
        self.admin_token = (first.data_dir / "admin-api-key").read_text().strip()
        for node in rest:
            self._launch(node)
        self._wait_healthy(rest)

    def _make_node(self, name: str, ip: str) -> ClusterNode:
        netns = f"kc{self.tag}{name}"
        _run("ip", "netns", "add", netns)
        self._netns.append(netns)
        host_end = f"kc{self.tag}{name}h"
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._links.append(host_end)
        _run("ip", "link", "set", host_end, "master", self.bridge)
        _run("ip", "link", "set", host_end, "up")
        _run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        root = self.root / name
        root.mkdir(exist_ok=True)
        return ClusterNode(name, netns, ip, root, self.shared_dir)

    def node_config(self, node: ClusterNode) -> dict[str, Any]:
        config: dict[str, Any] = {
            "data_dir": str(node.data_dir),
            "store": self.store_url,
            "secret_key": str(self.root / "secret.key"),
            "listen": f"{node.ip}:{PORT}",
            "pool": {"size": 0},
            "templates": False,
            "network": {"nat": False},
            "firewall": {"enabled": False},
            "cluster": {
                "node": node.name,
                "advertise": node.url,
                "secret_file": str(self.root / "cluster.secret"),
                "lease_s": self.lease_s,
                "shared_dir": str(self.shared_dir),
            },
        }
        for key, value in self.config.items():
            if isinstance(value, Mapping) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    def _launch(self, node: ClusterNode) -> None:
        path = node.root / "config.yaml"
        path.write_text(json.dumps(self.node_config(node), indent=2))  # JSON is YAML
        env = dict(os.environ, PYTHONPATH=str(self.src))
        argv = ["ip", "netns", "exec", node.netns, sys.executable, "-m", "kiln.cli"]
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen(
                [*argv, "serve", "--config", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _wait_healthy(self, nodes: Sequence[ClusterNode]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for node in nodes:
            while True:
                assert node.proc is not None
                if node.proc.poll() is not None:
                    raise RuntimeError(f"node {node.name} exited:\n{node.log_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{node.url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"node {node.name} not healthy in {START_TIMEOUT_S:.0f} s:\n"
                        f"{node.log_text()[-3000:]}"
                    )
                time.sleep(0.2)

    def create_on(self, name: str, token: str, body: Mapping[str, Any]) -> httpx.Response:
        """``POST /sandboxes`` made on node ``name`` itself, not placed elsewhere: signed
        with the cluster secret as a node forwarding a placed create signs it."""
        sender = next(n for n in self.names if n != name)
        peer = PeerAuth.load(sender, self.root / "cluster.secret", create=False)
        with self.nodes[name].client(token) as api:
            signed = {PEER_HEADER: peer.sign("POST", "/sandboxes")}
            return api.post("/sandboxes", json=dict(body), headers=signed)

    def restart(self, name: str) -> None:
        """Start a stopped or lost node's daemon again."""
        node = self.nodes[name]
        self._launch(node)
        self._wait_healthy([node])

    def stop(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop()
        with contextlib.suppress(Exception):
            _kill_all(f"{self.root}/")
        for netns in reversed(self._netns):
            _quietly("ip", "netns", "del", netns)
        self._netns.clear()
        for link in reversed(self._links):
            _quietly("ip", "link", "del", link)
        self._links.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None

    def each(self) -> Iterator[ClusterNode]:
        yield from self.nodes.values()
