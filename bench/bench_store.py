"""Store call latency on a real SQLite file (WAL, synchronous=NORMAL) and the thermal decision.

    .venv/bin/python -m bench store

The daemon calls the store directly from its event loop, so every call on the
request path should stay well under a millisecond.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kiln.engine.base import Status, Thermal
from kiln.protocol import ActivityInfo
from kiln.store import SandboxConfig, SecretBox, Store
from kiln.thermal import SandboxView, ThermalPolicy, decide

from ._stats import Row, print_table

REQUIRES: str | None = None  # stdlib sqlite3 and pyrage
N = 500
LIVE = 200  # sandboxes in the table while measuring


def _measure(fn: Callable[[int], object], n: int = N) -> list[float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        box = SecretBox(Path(tmp) / "secret.key")
        with Store.open(Path(tmp) / "kiln.db", secret_box=box) as store:
            user, key = store.create_user("bench")
            ids = [
                store.create_sandbox(
                    user.id, image="m", engine="qemu", enforce_quota=False, engine_state={"i": i}
                ).id
                for i in range(LIVE)
            ]
            store.put_secret(user.id, "TOKEN", "x" * 64)
            config = SandboxConfig(env={"A": "1"}, secrets=("TOKEN",))
            rows = [
                Row(
                    "create_sandbox",
                    _measure(
                        lambda i: store.create_sandbox(
                            user.id, image="m", engine="qemu", enforce_quota=False, config=config
                        )
                    ),
                    "< 1 ms",
                ),
                Row("user_by_key (auth)", _measure(lambda i: store.user_by_key(key)), "< 1 ms"),
                Row(
                    "find_sandbox (by id)",
                    _measure(lambda i: store.find_sandbox(user.id, ids[i % LIVE])),
                    "< 1 ms",
                ),
                Row(
                    "touch",
                    _measure(lambda i: store.touch(ids[i % LIVE], 2e9 + i)),
                    "< 1 ms",
                ),
                Row(
                    "set_engine_state",
                    _measure(lambda i: store.set_engine_state(ids[i % LIVE], {"i": i, "s": "x"})),
                    "< 1 ms",
                ),
                Row(
                    "put_secret (age encrypt)",
                    _measure(lambda i: store.put_secret(user.id, "TOKEN", f"v{i}")),
                    "< 2 ms",
                ),
                Row(
                    "get_secret_values (age decrypt)",
                    _measure(lambda i: store.get_secret_values(user.id, ["TOKEN"])),
                    "< 2 ms",
                ),
                Row(
                    f"list_live_sandboxes ({LIVE + N} rows)",
                    _measure(lambda i: store.list_live_sandboxes("qemu"), 50),
                    "",
                ),
            ]
    print_table("store calls (real SQLite file)", rows)

    now = 10_000.0
    views = [
        SandboxView(
            id=f"sb-{i}",
            thermal=(Thermal.HOT, Thermal.WARM, Thermal.COLD)[i % 3],
            status=Status.RUNNING,
            keep_hot=i % 7 == 0,
            state_since=now - 100,
            host_activity=now - (i % 120),
            agent=ActivityInfo(now - 50, i % 2, 0),
        )
        for i in range(1000)
    ]
    policy = ThermalPolicy()
    print_table(
        "thermal decision",
        [Row("decide() over 1000 sandboxes", _measure(lambda i: decide(now, views, policy), 200))],
    )


if __name__ == "__main__":
    main()
