"""Several real daemons (``serve()`` over the agent engine, in subprocesses) on one
PostgreSQL database of the run's real server: a cluster on loopback, each daemon a
node with its own data dir, all sharing the secret key and the cluster secret."""

from __future__ import annotations

from pathlib import Path

from .harness import kill_recorded_agents
from .test_daemon import Daemon

LEASE_S = 1.5


class Cluster:
    """Daemons sharing one store, secret key and cluster secret, each its own data dir."""

    def __init__(self, root: Path, pg_url: str) -> None:
        self.root = root
        self.pg_url = pg_url
        self.home = root / "home"
        self.home.mkdir()
        self.daemons: dict[str, Daemon] = {}

    def data(self, name: str) -> Path:
        return self.root / name / "data"

    def args(self, name: str, *extra: str) -> list[str]:
        return [
            "--store",
            self.pg_url,
            "--set",
            f"cluster.node={name}",
            "--set",
            f"cluster.lease_s={LEASE_S}",
            "--set",
            f"cluster.secret_file={self.root / 'cluster-secret'}",
            "--set",
            f"secret_key={self.root / 'secret.key'}",
            *extra,
        ]

    def start(self, name: str, *extra: str) -> Daemon:
        self.data(name).parent.mkdir(exist_ok=True)
        daemon = Daemon(self.data(name), self.home, *self.args(name, *extra))
        self.daemons[name] = daemon
        return daemon

    def key(self) -> str:
        for name in self.daemons:
            path = self.data(name) / "admin-api-key"
            if path.exists():
                return path.read_text().strip()
        raise AssertionError("no daemon bootstrapped the admin")

    def close(self) -> None:
        for name, daemon in self.daemons.items():
            daemon.close()
            kill_recorded_agents(self.data(name) / "engine")
