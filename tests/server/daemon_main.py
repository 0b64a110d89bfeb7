"""``python tests/server/daemon_main.py DATA_DIR [--store URL] [--unavailable]
[--set KEY=VALUE]...``: the real daemon over the agent engine.

This is :func:`kiln.server.serve` exactly as ``kiln serve`` runs it (store,
secret key, admin bootstrap, recovery, thermal manager, uvicorn, signal
handling), except that the engine is the test harness's fake engine with real
agents. The URL is printed on stdout once the API answers. ``--set`` overrides one
configuration key (dotted, as ``kiln serve --set``). On a PostgreSQL store the daemon
is a cluster node: unless told otherwise it listens on a free loopback port, which it
also advertises.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.config import load_config
from kiln.server import serve
from kiln.server.daemon import UnavailableEngine
from server.harness import AgentEngine


def main() -> None:
    data_dir = Path(sys.argv[1])
    store = sys.argv[sys.argv.index("--store") + 1] if "--store" in sys.argv else None
    overrides: dict[str, object] = {
        "data_dir": str(data_dir),
        "store": store,
        "listen": "127.0.0.1:0",
        "thermal.tick_s": 0.5,
    }
    if store is not None and store.startswith("postgresql://"):
        port = _free_port()
        overrides["listen"] = f"127.0.0.1:{port}"
        overrides["cluster.advertise"] = f"http://127.0.0.1:{port}"
    for n, arg in enumerate(sys.argv):
        if arg == "--set":
            key, _, value = sys.argv[n + 1].partition("=")
            if value:
                overrides[key] = value
            else:  # KEY=: back to the default
                overrides.pop(key, None)
    config = load_config(None, overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = (
        UnavailableEngine("no engine in this test")
        if "--unavailable" in sys.argv
        else AgentEngine(data_dir / "engine")
    )
    asyncio.run(serve(config, engine=engine, ready=lambda url: print(url, flush=True)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
