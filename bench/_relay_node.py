"""``python bench/_relay_node.py NAME ROOT STORE_URL SECRET_FILE``: one cluster node for
:mod:`bench.bench_relay`, in a process of its own (as a real node is).

The tests' in-process daemon (``tests/server/harness.py``: uvicorn + FastAPI +
services, the fake engine with real test-mode agents) on the shared PostgreSQL
store, made node NAME (``services.cluster`` set, registered with a long lease).
Prints its URL once it answers; runs until its stdin closes.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kiln.cluster import ClusterNode, PeerAuth  # noqa: E402
from server.harness import LiveServer  # noqa: E402


def main() -> None:
    name, root, store, secret_file = sys.argv[1:5]
    live = LiveServer(Path(root), store_target=store).start()
    try:
        live.services.cluster = ClusterNode(live.store, PeerAuth.load(name, Path(secret_file)))
        live.store.register_node(
            name,
            address=live.url,
            engines=("fake",),
            cpus=4,
            memory_mb=8192,
            disk_mb=10_000,
            lease_s=3600.0,
        )
        print(live.url, flush=True)
        sys.stdin.read()
    finally:
        live.stop()


if __name__ == "__main__":
    main()
