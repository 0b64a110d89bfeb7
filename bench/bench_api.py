"""HTTP API latency: what the daemon adds on top of the guest agent.

    .venv/bin/python -m bench.bench_api

Part 1 runs the real API (uvicorn + FastAPI + services + SQLite store, the
server in a thread, httpx clients in this one) over the **fake engine with a
real test-mode agent per sandbox** (``tests/fakes`` + ``tests/server/harness``):
no VM, so the numbers are the API layer itself on top of the same agent path
the direct client uses.

Part 2 (root, QEMU and a built image) repeats the exec comparison on a real
microVM and measures list latency while a VM boots and while one is
snapshotted, with the sandbox network in a network namespace this benchmark
creates and deletes.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ._harness import agent_skip_reason, ms_since, vm_skip_reason
from ._stats import Row, print_table, print_values

REQUIRES: str | None = "the guest agent in --test-mode; for part 2 root, QEMU, a built image"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

N = 300
WARMUP = 30


def skip_reason() -> str | None:
    return agent_skip_reason()


def timed(fn: Callable[[], object], n: int = N, warmup: int = WARMUP) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(ms_since(start))
    return samples


def exec_pair_samples(
    server: Any, http: httpx.Client, sandbox_id: str, n: int = N, warmup: int = WARMUP
) -> tuple[list[float], list[float]]:
    """``exec true`` on one sandbox, alternately with the agent client directly (timed on
    the server's own event loop) and through ``POST /sandboxes/{id}/exec``, so both see
    the same machine load."""
    client = server.call(lambda: server.engine.agent(sandbox_id))

    async def direct_once() -> float:
        start = time.perf_counter()
        await client.exec(["true"])
        return ms_since(start)

    def api_once() -> float:
        start = time.perf_counter()
        r = http.post(f"/sandboxes/{sandbox_id}/exec", json={"cmd": ["true"]})
        elapsed = ms_since(start)
        assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
        return elapsed

    direct: list[float] = []
    via_api: list[float] = []
    for i in range(warmup + n):
        d = server.call(direct_once)
        a = api_once()
        if i >= warmup:
            direct.append(d)
            via_api.append(a)
    return direct, via_api


def concurrent_execs(url: str, key: str, sandbox: str, rounds: int = 20) -> tuple[list, list]:
    async def run() -> tuple[list[float], list[float]]:
        per_request: list[float] = []
        per_round: list[float] = []
        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=10)
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as c:

            async def one() -> float:
                start = time.perf_counter()
                r = await c.post(f"/sandboxes/{sandbox}/exec", json={"cmd": ["true"]})
                assert r.status_code == 200, r.text
                return ms_since(start)

            for i in range(rounds + 3):
                start = time.perf_counter()
                results = await asyncio.gather(*(one() for _ in range(10)))
                if i >= 3:  # warm-up rounds
                    per_round.append(ms_since(start))
                    per_request.extend(results)
        return per_request, per_round

    return asyncio.run(run())


@contextmanager
def background(work: Callable[[], None]) -> Iterator[list[int]]:
    """Run ``work`` repeatedly in a thread until the block ends; yields a cycle counter."""
    stop = threading.Event()
    cycles = [0]
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                work()
            except BaseException as exc:
                errors.append(exc)
                return
            cycles[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield cycles
    finally:
        stop.set()
        thread.join(120)
        if errors:
            raise errors[0]


def part1() -> None:
    from server.harness import LiveServer  # noqa: PLC0415 -- the test harness, on sys.path

    root = Path(tempfile.mkdtemp(prefix="kbapi-"))
    server = LiveServer(root, lazy_agents=True).start()
    try:
        _, key = server.store.create_user("bench")
        _, key2 = server.store.create_user("bench-lifecycle")
        headers = {"Authorization": f"Bearer {key}"}
        http = httpx.Client(base_url=server.url, headers=headers, timeout=60)
        other = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key2}"}, timeout=60
        )
        sb = http.post("/sandboxes", json={"name": "bench"}).json()

        direct, via_api = exec_pair_samples(server, http, sb["id"])
        health = timed(lambda: http.get("/health"), n=1000)
        listing1 = timed(lambda: http.get("/sandboxes"), n=500)
        for i in range(99):
            http.post("/sandboxes", json={"name": f"s{i:03d}"})
        assert len(http.get("/sandboxes").json()) == 100
        listing100 = timed(lambda: http.get("/sandboxes"), n=500)
        get_one = timed(lambda: http.get("/sandboxes/s050"), n=500)
        conc_req, conc_round = concurrent_execs(server.url, key, "bench")

        def lifecycle() -> None:
            # Create (a real agent process is spawned), snapshot (stop), delete.
            r = other.post("/sandboxes", json={})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            server.engine.lazy = False
            assert other.post(f"/sandboxes/{sid}/stop").status_code == 200
            assert other.delete(f"/sandboxes/{sid}").status_code == 204

        server.engine.lazy = False
        with background(lifecycle) as cycles:
            time.sleep(0.5)
            busy_list = timed(lambda: http.get("/sandboxes"), n=300, warmup=0)
        http.close()
        other.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    print_table(
        "API vs agent client (fake engine + real test-mode agent, no VM)",
        [
            Row("exec true: agent client directly", direct),
            Row("exec true: POST /sandboxes/{id}/exec", via_api),
            Row("GET /health", health, "p50 <= 1 ms"),
            Row("GET /sandboxes (1 sandbox)", listing1),
            Row("GET /sandboxes (100 sandboxes)", listing100, "p50 <= 10 ms"),
            Row("GET /sandboxes/{name} (of 100)", get_one),
            Row("10 concurrent API execs: each request", conc_req),
            Row("10 concurrent API execs: whole round", conc_round),
            Row("GET /sandboxes (100) during create/stop/delete", busy_list),
        ],
    )
    added = Row("", via_api).pct(50) - Row("", direct).pct(50)
    print_values(
        "API overhead",
        [
            ("exec true added by the API, p50", f"{added:.3f} ms", "<= 2 ms"),
            ("lifecycle cycles during the busy list", str(cycles[0]), ""),
        ],
    )


# ------------------------------------------------------------------ part 2: real VMs


def part2() -> None:
    from kiln.engine.qemu import QemuConfig, QemuEngine  # noqa: PLC0415
    from kiln.images import ensure_image  # noqa: PLC0415
    from kiln.network import NetworkConfig  # noqa: PLC0415
    from server.harness import LiveServer  # noqa: PLC0415

    ensure_image("minimal", progress=lambda m: print(f"  image: {m}", flush=True))
    netns = f"kiln-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    root = Path(tempfile.mkdtemp(prefix="kbvm-"))
    net = NetworkConfig(netns=netns, bridge="kbench0", subnet="10.213.77.0/24", nat=False)

    def factory(data: Path) -> QemuEngine:
        return QemuEngine(
            QemuConfig(data_dir=data / "qemu", volumes_dir=data / "volumes", network=net)
        )

    server = LiveServer(root, engine_factory=factory, config_overrides={"network": net})
    try:
        server.start()
        _, key = server.store.create_user("bench")
        http = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=600
        )
        t = time.perf_counter()
        sb = http.post("/sandboxes", json={"name": "vm"}).json()
        create_ms = ms_since(t)
        direct, via_api = exec_pair_samples(server, http, sb["id"], n=60, warmup=5)
        idle_list = timed(lambda: http.get("/sandboxes"), n=200)

        box: dict[str, Any] = {}

        def boot() -> None:
            if "id" in box:
                return
            r = http.post("/sandboxes", json={"name": "booting"})
            box["id"] = r.json()["id"]

        list_client = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        booting = threading.Thread(target=boot)
        booting.start()
        during_boot = []
        while booting.is_alive():
            start = time.perf_counter()
            list_client.get("/sandboxes")
            during_boot.append(ms_since(start))
            time.sleep(0.005)
        booting.join()

        stopping = threading.Thread(target=lambda: http.post("/sandboxes/booting/stop"))
        t = time.perf_counter()
        stopping.start()
        during_stop = []
        while stopping.is_alive():
            start = time.perf_counter()
            list_client.get("/sandboxes")
            during_stop.append(ms_since(start))
            time.sleep(0.002)
        stopping.join()
        stop_ms = ms_since(t)
        for name in ("vm", "booting"):
            http.delete(f"/sandboxes/{name}")
        http.close()
        list_client.close()
    finally:
        if server.url:
            server.stop()
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(root, ignore_errors=True)

    print_table(
        "API on a real microVM (QEMU, own network namespace)",
        [
            Row("exec true: agent client directly", direct),
            Row("exec true: POST /sandboxes/{id}/exec", via_api),
            Row("GET /sandboxes (idle)", idle_list),
            Row("GET /sandboxes while a VM boots", during_boot),
            Row("GET /sandboxes while a VM is snapshotted", during_stop),
        ],
    )
    added = Row("", via_api).pct(50) - Row("", direct).pct(50)
    print_values(
        "microVM",
        [
            ("exec true added by the API, p50", f"{added:.3f} ms", "<= 2 ms"),
            ("POST /sandboxes (boot to agent)", f"{create_ms:.0f} ms", ""),
            ("POST /sandboxes/{id}/stop (snapshot)", f"{stop_ms:.0f} ms", ""),
        ],
    )


def main() -> None:
    part1()
    reason = vm_skip_reason()
    if reason is not None:
        print(f"\n(part 2, real microVMs, skipped: {reason})")
        return
    part2()


if __name__ == "__main__":
    main()
