"""Background processes through the HTTP API: what the API adds to the agent's work.

    .venv/bin/python -m bench.bench_processes

The real API (uvicorn + FastAPI + services + SQLite store, the server in a
thread, httpx clients in this one) over the fake engine with a **real
test-mode agent** per sandbox (``tests/server/harness``): no VM, so the
numbers are the API layer and the agent's process table. Each measured row is
printed beside its reference:

(a) start a background command and read its first output line (POST
    /processes, then GET .../output to the first line) vs a plain buffered exec
    of the same command;
(b) replay of 1 MiB of kept output to a new reader through the API vs the
    agent client reading the same replay directly;
(c) GET /processes with 100 background processes in the sandbox vs the agent
    client's list_processes.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ._harness import agent_skip_reason, ms_since
from ._stats import Row, print_table, print_values

REQUIRES: str | None = "the guest agent in --test-mode"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

N = 200
WARMUP = 20
MIB = 1 << 20


def skip_reason() -> str | None:
    return agent_skip_reason()


def alternate(
    a: Callable[[], float], b: Callable[[], float], n: int, warmup: int
) -> tuple[list[float], list[float]]:
    """``a`` and ``b`` in turns (each returns its own time), so both see the same load."""
    xs: list[float] = []
    ys: list[float] = []
    for i in range(warmup + n):
        x, y = a(), b()
        if i >= warmup:
            xs.append(x)
            ys.append(y)
    return xs, ys


def first_line_samples(http: httpx.Client, sb: str) -> tuple[list[float], list[float]]:
    cmd = ["echo", "ready"]

    def exec_once() -> float:
        start = time.perf_counter()
        r = http.post(f"/sandboxes/{sb}/exec", json={"cmd": cmd})
        elapsed = ms_since(start)
        assert r.json()["stdout"] == "ready\n", r.text
        return elapsed

    def background_once() -> float:
        start = time.perf_counter()
        r = http.post(f"/sandboxes/{sb}/processes", json={"cmd": cmd})
        assert r.status_code == 201, r.text
        with http.stream("GET", f"/sandboxes/{sb}/processes/{r.json()['pid']}/output") as out:
            line = next(out.iter_lines())
        elapsed = ms_since(start)
        assert line == '{"type":"stdout","data":"ready\\n"}', line
        return elapsed

    return alternate(exec_once, background_once, N, WARMUP)


def replay_samples(server: Any, http: httpx.Client, sb: str) -> tuple[list[float], list[float]]:
    script = f"head -c {MIB} /dev/zero | tr '\\0' x"
    r = http.post(f"/sandboxes/{sb}/processes", json={"cmd": ["sh", "-c", script]})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    while http.get(f"/sandboxes/{sb}/processes/{pid}").json()["running"]:
        time.sleep(0.01)
    client = server.call(lambda: server.engine.agent(sb))

    async def direct() -> float:
        start = time.perf_counter()
        size = 0
        async with client.process_output(pid) as events:
            async for event in events:
                size += len(getattr(event, "data", b""))
        elapsed = ms_since(start)
        assert size == MIB, size
        return elapsed

    def via_api() -> float:
        start = time.perf_counter()
        size = 0
        with http.stream("GET", f"/sandboxes/{sb}/processes/{pid}/output") as out:
            for line in out.iter_lines():
                if line.startswith('{"type":"stdout"'):
                    size += len(line) - len('{"type":"stdout","data":""}')
        elapsed = ms_since(start)
        assert size == MIB, size
        return elapsed

    return alternate(lambda: server.call(direct), via_api, 50, 5)


def list_samples(server: Any, http: httpx.Client, sb: str) -> tuple[list[float], list[float]]:
    for _ in range(100):
        r = http.post(f"/sandboxes/{sb}/processes", json={"cmd": ["sleep", "600"]})
        assert r.status_code == 201, r.text
    client = server.call(lambda: server.engine.agent(sb))

    async def direct() -> float:
        start = time.perf_counter()
        listed = await client.list_processes()
        elapsed = ms_since(start)
        assert len(listed) == 100, len(listed)
        return elapsed

    def via_api() -> float:
        start = time.perf_counter()
        r = http.get(f"/sandboxes/{sb}/processes")
        elapsed = ms_since(start)
        assert len(r.json()) == 100, r.text[:200]
        return elapsed

    return alternate(lambda: server.call(direct), via_api, N, WARMUP)


def main() -> None:
    from server.harness import LiveServer  # noqa: PLC0415 -- the test harness, on sys.path

    root = Path(tempfile.mkdtemp(prefix="kbproc-"))
    server = LiveServer(root).start()
    try:
        _, key = server.store.create_user("bench")
        http = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        ids = [http.post("/sandboxes", json={"name": n}).json()["id"] for n in ("a", "b", "c")]
        exec_ref, first_line = first_line_samples(http, ids[0])
        replay_ref, replay = replay_samples(server, http, ids[1])
        list_ref, listing = list_samples(server, http, ids[2])
        for sb in ids:
            http.delete(f"/sandboxes/{sb}")
        http.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    print_table(
        "Background processes via the API (fake engine + real test-mode agent, no VM)",
        [
            Row("(a) ref: POST /exec echo (buffered)", exec_ref),
            Row("(a) POST /processes + first output line", first_line, "<= ref + 2 ms"),
            Row("(b) ref: agent client replay of 1 MiB", replay_ref),
            Row("(b) GET .../output replay of 1 MiB", replay, "<= 20 ms"),
            Row("(c) ref: agent client list, 100 processes", list_ref),
            Row("(c) GET /processes, 100 processes", listing, "<= 10 ms"),
        ],
    )
    print_values(
        "Added by background processes over the reference",
        [
            (
                f"(a) first line vs exec, p{p}",
                f"{Row('', first_line).pct(p) - Row('', exec_ref).pct(p):+.3f} ms",
                "<= 2 ms" if p == 50 else "",
            )
            for p in (50, 95, 99)
        ],
    )
