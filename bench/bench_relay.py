"""What relaying through another node adds: exec on the owning node vs through a
relaying node, measured in the same run.

    .venv/bin/python -m bench relay

Two nodes, each the real daemon in a process of its own (``serve()`` as
``kiln serve`` runs it, via ``tests/server/daemon_main.py``: the fake engine
with real test-mode agents), registered on one throwaway PostgreSQL store
(``kiln.testing.postgres``, loopback). One sandbox lives on node B.
Rows, each pair with the direct call to B as the reference:

- ``GET /sandboxes/{id}``: the relay's own cost beside an answer from the store;

- ``exec true`` (buffered): ``POST /sandboxes/{id}/exec`` to B, and to A (which
  relays it to B over a kept connection);
- a streamed exec's first line (``Accept: application/x-ndjson``, ``echo x``):
  time from sending the request to the first NDJSON line.

Goal: the relay adds at most 3 ms at p50. Both nodes and the client share this
host's two cores, so the relayed rows also pay for a third process's turn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from ._harness import agent_skip_reason
from ._stats import Row, print_table

REQUIRES: str | None = "PostgreSQL server binaries (scripts/bootstrap installs postgresql)"

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "tests" / "server" / "daemon_main.py"
N = 500
WARMUP = 30
GOAL = "≤ reference + 3 ms p50"


def skip_reason() -> str | None:
    from kiln.testing.postgres import PostgresNotInstalled, find_bindir  # noqa: PLC0415

    try:
        find_bindir()
    except PostgresNotInstalled as exc:
        return str(exc)
    return agent_skip_reason()


@contextlib.contextmanager
def _node(name: str, base: Path, store: str) -> Iterator[str]:
    """Node ``name``: the real daemon (``serve()``, ``tests/server/daemon_main.py``)."""
    data = base / name / "data"
    data.parent.mkdir(parents=True)
    (base / "home").mkdir(exist_ok=True)
    sets = {
        "cluster.node": name,
        "cluster.secret_file": base / "cluster-secret",
        "secret_key": base / "secret.key",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    with (base / name / "daemon.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(MAIN), str(data), "--store", store, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), HOME=str(base / "home")),
        )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"node {name} did not start: see {base / name / 'daemon.log'}")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sys.path.insert(0, str(ROOT / "tests"))
        from server.harness import kill_recorded_agents  # noqa: PLC0415 - the tests' harness

        kill_recorded_agents(data / "engine")


def _timed(fn: Callable[[], float | None]) -> float:
    t0 = time.perf_counter()
    own = fn()
    return own if own is not None else (time.perf_counter() - t0) * 1000


def _pair(
    direct: Callable[[], float | None], relayed: Callable[[], float | None]
) -> tuple[list[float], list[float]]:
    """Samples of both, taken alternately so that the host's load (two cores shared
    with whatever else runs) weighs on both alike. ``fn`` returns its own sample
    (ms) or None to be timed whole."""
    for _ in range(WARMUP):
        direct()
        relayed()
    a, b = [], []
    for _ in range(N):
        a.append(_timed(direct))
        b.append(_timed(relayed))
    return a, b


def _exec_true(c: httpx.Client, sandbox: str) -> Callable[[], None]:
    def call() -> None:
        r = c.post(f"/sandboxes/{sandbox}/exec", json={"cmd": ["true"]})
        r.raise_for_status()

    return call


def _get(c: httpx.Client, sandbox: str) -> Callable[[], None]:
    def call() -> None:
        c.get(f"/sandboxes/{sandbox}").raise_for_status()

    return call


def _first_line(c: httpx.Client, sandbox: str) -> Callable[[], float]:
    def call() -> float:
        t0 = time.perf_counter()
        with c.stream(
            "POST",
            f"/sandboxes/{sandbox}/exec",
            json={"cmd": ["echo", "x"]},
            headers={"Accept": "application/x-ndjson"},
        ) as r:
            r.raise_for_status()
            first = None
            for line in r.iter_lines():
                if line and first is None:
                    first = (time.perf_counter() - t0) * 1000
        assert first is not None
        return first

    return call


def main() -> None:
    from kiln.testing.postgres import PostgresServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp, PostgresServer.start() as pg:
        base = Path(tmp)
        url = pg.create_database()
        with _node("b", base, url) as b_url, _node("a", base, url) as a_url:
            key = (base / "b" / "data" / "admin-api-key").read_text().strip()
            headers = {"Authorization": f"Bearer {key}"}
            with (
                httpx.Client(base_url=b_url, headers=headers, timeout=30) as on_b,
                httpx.Client(base_url=a_url, headers=headers, timeout=30) as via_a,
            ):
                # Kept on b: a takes no new sandboxes while it drains.
                via_a.post("/nodes/a/drain").raise_for_status()
                r = on_b.post("/sandboxes", json={"name": "bench"})
                r.raise_for_status()
                via_a.post("/nodes/a/undrain").raise_for_status()
                sb = r.json()["id"]
                assert r.json()["node"] == "b"
                assert via_a.get(f"/sandboxes/{sb}").headers.get("x-kiln-node") == "b"
                get_b, get_a = _pair(_get(on_b, sb), _get(via_a, sb))
                exec_b, exec_a = _pair(_exec_true(on_b, sb), _exec_true(via_a, sb))
                line_b, line_a = _pair(_first_line(on_b, sb), _first_line(via_a, sb))
                rows = [
                    Row("GET /sandboxes/{id}: on the owning node", get_b, "reference"),
                    Row("GET /sandboxes/{id}: through a relaying node", get_a, ""),
                    Row("exec true: on the owning node", exec_b, "reference"),
                    Row("exec true: through a relaying node", exec_a, GOAL),
                    Row("stream first line: on the owning node", line_b, "reference"),
                    Row("stream first line: through a relaying node", line_a, GOAL),
                ]
    print_table("exec through a relaying node vs on the owning node (B)", rows)


if __name__ == "__main__":
    main()
