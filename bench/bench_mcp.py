"""``kiln mcp`` overhead: a tool call through the MCP server vs the same call by the SDK.

    .venv/bin/python -m bench.bench_mcp

Starts the test daemon of ``bench_cli`` (real HTTP, real SQLite, a test-mode
guest agent, no VM) and one ``kiln mcp`` subprocess driven by the ``mcp`` SDK's
stdio client. The reference row is ``AsyncKiln`` calling the daemon directly in
the same run, the two taking turns; the difference is JSON-RPC over two pipes plus the server's
argument validation and result conversion. Also: how long ``kiln mcp`` takes
to answer ``initialize`` (the MCP SDK's import dominates), and ``kiln --help``,
which must not import the MCP SDK.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from ._stats import Row, print_table
from .bench_cli import kiln_argv, target, timed
from .bench_cli import skip_reason as cli_skip_reason

REQUIRES: str | None = "the guest agent (kiln.guest), the daemon (kiln.server) and the mcp SDK"

SRC = Path(__file__).resolve().parent.parent / "src"
CALLS = 30
STARTS = 5
HELP_RUNS = 20


def skip_reason() -> str | None:
    try:
        import mcp.client.stdio  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"the mcp SDK does not import: {exc}"
    return cli_skip_reason()


async def _alternate(
    fns: dict[str, Callable[[], Awaitable[object]]], n: int, warmup: int = 5
) -> dict[str, list[float]]:
    """``n`` timed calls of each of ``fns``, taking turns, so that both see the same load."""
    for _ in range(warmup):
        for fn in fns.values():
            await fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            await fn()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


async def _measure(url: str, token: str, sandbox: str, home: str) -> dict[str, list[float]]:
    from mcp.client.session import ClientSession  # noqa: PLC0415
    from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: PLC0415

    from kiln.sdk import AsyncKiln  # noqa: PLC0415

    command, *args = kiln_argv()
    env = {"HOME": home, "KILN_URL": url, "KILN_TOKEN": token, "PYTHONPATH": str(SRC)}
    params = StdioServerParameters(command=command, args=[*args, "mcp"], env=env)
    results: dict[str, list[float]] = {"start": []}

    for _ in range(STARTS):
        t0 = time.perf_counter()
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            results["start"].append((time.perf_counter() - t0) * 1000)

    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
        AsyncKiln(url, token) as k,
    ):
        await session.initialize()
        arguments = {"sandbox": sandbox, "command": ["true"]}
        ref = k.sandboxes.ref(sandbox)

        async def via_mcp() -> None:
            result = await session.call_tool("exec", arguments)
            assert not result.is_error and result.structured_content, result
            assert result.structured_content["exit_code"] == 0

        async def via_sdk() -> None:
            assert (await ref.exec(["true"])).exit_code == 0

        results.update(await _alternate({"sdk": via_sdk, "mcp": via_mcp}, CALLS))
    return results


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-home-") as home, target() as t:
        url, token, sandbox = t
        results = anyio.run(_measure, url, token, sandbox, home)
        env = {**os.environ, "HOME": home, "PYTHONPATH": str(SRC)}

        def kiln_help() -> bool:
            argv = [*kiln_argv(), "--help"]
            proc = subprocess.run(argv, stdout=subprocess.DEVNULL, env=env, check=False)
            return proc.returncode == 0

        help_ms, _ = timed(kiln_help, HELP_RUNS)
        python_ms, _ = timed(
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0,
            HELP_RUNS,
        )

    print_table(
        "kiln mcp (test daemon; one tool call, exec ['true'])",
        [
            Row("SDK AsyncKiln exec (reference)", results["sdk"]),
            Row("MCP call_tool exec via kiln mcp", results["mcp"]),
            Row("kiln mcp start to initialize answered", results["start"]),
            Row("python -c pass (interpreter floor)", python_ms),
            Row("kiln --help", help_ms, "< 150 ms"),
        ],
    )


if __name__ == "__main__":
    main()
