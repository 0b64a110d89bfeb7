"""The placement decision on PostgreSQL: 100 nodes and 10,000 live sandboxes in the store.

    .venv/bin/python -m bench placement

One decision is :meth:`kiln.cluster.placement.Placer.reserve`: one store transaction
that reads every live node and what its sandboxes take (an aggregate over the
10,000 rows), draws two candidates, locks their rows (``FOR UPDATE``), reads them
again and counts the create as starting on the chosen one. Each is followed by an
untimed release, so every decision sees the same store. The reference rows are the
same server's simplest round trips, measured in the same run: ``get_node`` (one
indexed read) and ``release_node`` (one write transaction).

PostgreSQL is a throwaway local server (``kiln.testing.postgres``, on 127.0.0.1,
``fsync`` off): a real deployment adds its network's round trip to each of the
decision's statements (five). Goal: ≤ 10 ms p50.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from kiln.cluster.placement import Placer, Shape
from kiln.store import Store

from ._stats import Row, print_table

REQUIRES: str | None = "PostgreSQL server binaries (scripts/bootstrap installs postgresql)"

NODES = 100
SANDBOXES = 10_000
N = 500
WARMUP = 20
SHAPE = Shape(engine="qemu", cpus=1, memory_mb=256)


def skip_reason() -> str | None:
    from kiln.testing.postgres import PostgresNotInstalled, find_bindir  # noqa: PLC0415

    try:
        find_bindir()
    except PostgresNotInstalled as exc:
        return str(exc)
    return None


def _measure(
    fn: Callable[[int], object], after: Callable[[int], object] | None = None
) -> list[float]:
    for i in range(WARMUP):
        fn(i)
        if after is not None:
            after(i)
    samples = []
    for i in range(N):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1000)
        if after is not None:
            after(i)
    return samples


def _fill(store: Store) -> None:
    """NODES nodes, SANDBOXES live sandboxes spread over them (one user, no quota)."""
    for n in range(NODES):
        store.register_node(
            f"node-{n:03d}",
            address=f"http://10.0.{n // 250}.{n % 250 + 1}:8080",
            engines=("qemu", "docker", "docker/runc"),
            cpus=64,
            memory_mb=256 * 1024,
            disk_mb=1 << 20,
            lease_s=3600,
            load=random.random() * 4,
        )
    user, _key = store.create_user("bench")
    for i in range(SANDBOXES):
        store.create_sandbox(
            user.id,
            image="minimal",
            engine="qemu",
            cpus=1 + i % 2,
            memory_mb=256 * (1 + i % 4),
            enforce_quota=False,
            node=f"node-{i % NODES:03d}",
        )


def main() -> None:
    from kiln.testing.postgres import PostgresServer  # noqa: PLC0415

    with PostgresServer.start() as pg, Store.open(pg.create_database()) as store:
        started = time.perf_counter()
        _fill(store)
        print(
            f"store: {NODES} nodes, {store.count_sandboxes()} live sandboxes"
            f" (filled in {time.perf_counter() - started:.1f} s)"
        )
        placer = Placer(store, rng=random.Random(1))
        chosen: list[str] = []

        def reserve(i: int) -> None:
            chosen.append(placer.reserve(SHAPE).name)

        def release(i: int) -> None:
            placer.release(chosen.pop(), SHAPE)

        rows = [
            Row("get_node (one read)", _measure(lambda i: store.get_node("node-042")), "reference"),
            Row(
                "release_node (one write transaction)",
                _measure(lambda i: store.release_node("node-042", cpus=0, memory_mb=0)),
                "reference",
            ),
            Row(
                f"placement ({NODES} nodes, {SANDBOXES // 1000}k sandboxes)",
                _measure(reserve, release),
                "≤ 10 ms p50",
            ),
        ]
    print_table("Placement on PostgreSQL (Placer.reserve: one locking transaction)", rows)


if __name__ == "__main__":
    main()
