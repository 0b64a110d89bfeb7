"""Agent client latency against a real test-mode agent (Unix sockets, no VM).

    .venv/bin/python -m bench.bench_client

Starts its own ``python -m kiln.guest --test-mode`` subprocess. Numbers are
client + agent + process spawn on this host; a VM adds its network hop and a
slower guest.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.agent_client import AgentClient, Stdout

from ._stats import Row, print_table, print_values

REQUIRES: str | None = "the guest agent (kiln.guest) runnable in --test-mode"

SRC = Path(__file__).resolve().parent.parent / "src"
WARMUP = 30


def skip_reason() -> str | None:
    if importlib.util.find_spec("kiln.guest.__main__") is None:
        return "kiln.guest has no __main__ (the agent is not built yet)"
    return None


@contextmanager
def test_mode_agent() -> Iterator[tuple[Path, str]]:
    """A test-mode agent subprocess; yields (socket dir, token)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    token = secrets.token_hex(16)
    argv = [sys.executable, "-m", "kiln.guest", "--test-mode", "--socket-dir", str(sock_dir)]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([*argv, "--token", token], env=env)
    try:
        deadline = time.monotonic() + 10
        while not all((sock_dir / n).exists() for n in ("control.sock", "forward.sock")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the test-mode agent did not start")
            time.sleep(0.01)
        yield sock_dir, token
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


async def sample(fn: Callable[[], Awaitable[object]], n: int, warmup: int = WARMUP) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def run(sock_dir: Path, token: str) -> None:
    client = AgentClient.unix_dir(sock_dir, token)
    await client.wait_ready(10)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        path = str(work / "f.txt")
        kb = os.urandom(1024)

        async def exec_true() -> None:
            result = await client.exec(["true"])
            assert result.exit_code == 0

        async def file_cycle() -> None:
            await client.write_file(path, kb)
            got = await client.read_file(path)
            assert got.data == kb

        async def write_1k() -> None:
            await client.write_file(path, kb)

        async def read_1k() -> None:
            await client.read_file(path)

        async def ten_concurrent() -> None:
            results = await asyncio.gather(*(client.exec(["true"]) for _ in range(10)))
            assert all(r.exit_code == 0 for r in results)

        async def five_reads() -> None:
            await asyncio.gather(*(client.read_file(path) for _ in range(5)))

        async def one_mib() -> None:
            result = await client.exec(["head", "-c", "1048576", "/dev/zero"])
            assert len(result.stdout) == 1 << 20

        ttfb: list[float] = []

        async def streaming() -> None:
            t0 = time.perf_counter()
            async with client.exec_stream(["sh", "-c", "echo first; sleep 0.001"]) as proc:
                async for event in proc:
                    if isinstance(event, Stdout):
                        ttfb.append((time.perf_counter() - t0) * 1000)
                        break  # leaving early kills it: part of the measured path

        rows = [
            Row("activity (round trip, no spawn)", await sample(client.activity, 300)),
            Row("stat", await sample(lambda: client.stat(str(work)), 300)),
            Row("exec true", await sample(exec_true, 300), "p50 ≤ 3 ms, p99 ≤ 10 ms"),
            Row("1 KB write + read cycle", await sample(file_cycle, 200), "p50 ≤ 2 ms"),
            Row("1 KB write", await sample(write_1k, 200)),
            Row("1 KB read", await sample(read_1k, 200)),
            Row("5 concurrent 1 KB reads", await sample(five_reads, 100)),
            Row("10 concurrent exec true", await sample(ten_concurrent, 60, 5), "p50 ≤ 30 ms"),
            Row("exec 1 MiB of stdout", await sample(one_mib, 50, 5)),
        ]
        await sample(streaming, 100, 10)
        rows.append(Row("streaming exec: time to first byte", ttfb[10:]))
        print_table("agent client (test-mode agent over Unix sockets)", rows)

        by_name = {r.name: r for r in rows}
        ex = by_name["exec true"]
        fc = by_name["1 KB write + read cycle"]
        cc = by_name["10 concurrent exec true"]

        def ok(flag: bool) -> str:
            return "ok" if flag else "MISSED"

        print_values(
            "agent client: targets",
            [
                ("exec true p50", f"{ex.pct(50):.3f} ms", f"≤ 3 ms: {ok(ex.pct(50) <= 3)}"),
                ("exec true p99", f"{ex.pct(99):.3f} ms", f"≤ 10 ms: {ok(ex.pct(99) <= 10)}"),
                ("1 KB write+read p50", f"{fc.pct(50):.3f} ms", f"≤ 2 ms: {ok(fc.pct(50) <= 2)}"),
                (
                    "10 concurrent execs p50",
                    f"{cc.pct(50):.3f} ms",
                    f"≤ 30 ms: {ok(cc.pct(50) <= 30)}",
                ),
                (
                    "1 MiB stdout throughput (p50)",
                    f"{1 / (by_name['exec 1 MiB of stdout'].pct(50) / 1000):.0f} MiB/s",
                    "",
                ),
            ],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    with test_mode_agent() as (sock_dir, token):
        asyncio.run(run(sock_dir, token))


if __name__ == "__main__":
    main()
