"""``python tests/server/daemon_main.py DATA_DIR [--store URL] [--unavailable]``: the real
daemon over the agent engine.

This is :func:`kiln.server.serve` exactly as ``kiln serve`` runs it (store,
secret key, admin bootstrap, recovery, thermal manager, uvicorn, signal
handling), except that the engine is the test harness's fake engine with real
agents. The URL is printed on stdout once the API answers.
"""

from __future__ import annotations

import asyncio
import logging
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
    config = load_config(
        None,
        {
            "data_dir": str(data_dir),
            "store": store,
            "listen": "127.0.0.1:0",
            "thermal.tick_s": 0.5,
        },
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = (
        UnavailableEngine("no engine in this test")
        if "--unavailable" in sys.argv
        else AgentEngine(data_dir / "engine")
    )
    asyncio.run(serve(config, engine=engine, ready=lambda url: print(url, flush=True)))


if __name__ == "__main__":
    main()
