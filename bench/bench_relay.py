"""What relaying through another node adds: exec on the owning node vs through a
relaying node, measured in the same run.

    .venv/bin/python -m bench relay

Two nodes, each its own process (``bench/_relay_node.py``: the tests' daemon
with the fake engine and real test-mode agents) on one throwaway PostgreSQL
store (``kiln.testing.postgres``, loopback). One sandbox lives on node B.
Rows, each pair with the direct call to B as the reference:

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
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from kiln.store import SecretBox, Store

from ._harness import agent_skip_reason
from ._stats import Row, print_table

REQUIRES: str | None = "PostgreSQL server binaries (scripts/bootstrap installs postgresql)"

ROOT = Path(__file__).resolve().parent.parent
N = 300
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
def _node(name: str, root: Path, store: str, secret: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "_relay_node.py"),
            name,
            str(root),
            store,
            str(secret),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"node {name} did not start")
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _measure(fn: Callable[[], float | None]) -> list[float]:
    """``fn`` returns its own sample (ms) or None to be timed whole."""
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(N):
        t0 = time.perf_counter()
        own = fn()
        samples.append(own if own is not None else (time.perf_counter() - t0) * 1000)
    return samples


def _exec_true(c: httpx.Client, sandbox: str) -> Callable[[], None]:
    def call() -> None:
        r = c.post(f"/sandboxes/{sandbox}/exec", json={"cmd": ["true"]})
        r.raise_for_status()

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
        secret = base / "cluster-secret"
        secret.write_text(secrets.token_hex(32) + "\n")
        with Store.open(url, secret_box=SecretBox(base / "secret.key")) as store:
            _user, key = store.create_user("bench")
        with (
            _node("b", base / "b", url, secret) as b_url,
            _node("a", base / "a", url, secret) as a_url,
        ):
            headers = {"Authorization": f"Bearer {key}"}
            with (
                httpx.Client(base_url=b_url, headers=headers, timeout=30) as on_b,
                httpx.Client(base_url=a_url, headers=headers, timeout=30) as via_a,
            ):
                r = on_b.post("/sandboxes", json={"name": "bench"})
                r.raise_for_status()
                sb = r.json()["id"]
                with Store.open(url, secret_box=SecretBox(base / "secret.key")) as store:
                    if store.get_sandbox(sb).node is None:  # a node records it itself later
                        store.set_sandbox_node(sb, "b")
                assert via_a.get(f"/sandboxes/{sb}").headers.get("x-kiln-node") == "b"
                rows = [
                    Row(
                        "exec true: on the owning node", _measure(_exec_true(on_b, sb)), "reference"
                    ),
                    Row(
                        "exec true: through a relaying node", _measure(_exec_true(via_a, sb)), GOAL
                    ),
                    Row(
                        "stream first line: on the owning node",
                        _measure(_first_line(on_b, sb)),
                        "reference",
                    ),
                    Row(
                        "stream first line: through a relaying node",
                        _measure(_first_line(via_a, sb)),
                        GOAL,
                    ),
                ]
    print_table("exec through a relaying node vs on the owning node (B)", rows)


if __name__ == "__main__":
    main()
