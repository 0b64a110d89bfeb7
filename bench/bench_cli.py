"""CLI latency: ``kiln exec SANDBOX -- true`` and ``kiln version``, process start included.

    .venv/bin/python -m bench.bench_cli

By default it starts the test daemon of ``tests/sdk/daemon.py`` in-process
(real HTTP on 127.0.0.1, real SQLite, a real test-mode guest agent per
sandbox, no VM), so the numbers are CLI start-up + HTTP + daemon + agent +
process spawn. To measure a real daemon and VM instead, set
``KILN_BENCH_SANDBOX`` to an existing sandbox (and ``KILN_URL``/``KILN_TOKEN``
or ``~/.kiln/config.yaml`` as for the CLI).

The SDK rows (the same exec from an already running Python process) show
how much of the CLI's time is interpreter and import start-up.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ._stats import Row, print_table, print_values

REQUIRES: str | None = "the guest agent (kiln.guest) and the daemon (kiln.server) importable"

ROOT = Path(__file__).resolve().parent.parent
RUNS = 20
SDK_RUNS = 50
KILN = Path(sys.executable).with_name("kiln")


def skip_reason() -> str | None:
    if os.environ.get("KILN_BENCH_SANDBOX"):
        return None
    for module in ("kiln.guest.__main__", "kiln.server.app"):
        if importlib.util.find_spec(module) is None:
            return f"cannot start a test daemon: {module} is missing"
    return None


def kiln_argv() -> list[str]:
    return [str(KILN)] if KILN.exists() else [sys.executable, "-m", "kiln.cli"]


@contextmanager
def target() -> Iterator[tuple[str, str, str]]:
    """(url, token, sandbox): the configured daemon, or a test daemon with a new sandbox."""
    from kiln.sdk import Kiln  # noqa: PLC0415

    existing = os.environ.get("KILN_BENCH_SANDBOX")
    if existing:
        with Kiln() as k:
            k.sandboxes.get(existing)
            yield k.url, k._token or "", existing
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from server.harness import LiveServer  # noqa: PLC0415 - the test harness, on demand

    with tempfile.TemporaryDirectory(prefix="kiln-bench-cli-") as tmp:
        server = LiveServer(Path(tmp)).start()
        try:
            _, token = server.store.create_user("bench-cli")
            with Kiln(server.url, token) as k:
                sb = k.sandboxes.create(name="bench-cli")
                yield server.url, token, sb.name
        finally:
            server.stop()


def timed(fn: Callable[[], bool], n: int, warmup: int = 2) -> tuple[list[float], int]:
    """Wall times (ms) of ``n`` runs of ``fn`` and how many failed (returned False)."""
    for _ in range(warmup):
        fn()
    samples, failures = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        ok = fn()
        samples.append((time.perf_counter() - t0) * 1000)
        failures += not ok
    return samples, failures


def main() -> None:
    from kiln.sdk import Kiln  # noqa: PLC0415

    with (
        tempfile.TemporaryDirectory(prefix="kiln-bench-home-") as home,
        target() as (
            url,
            token,
            sandbox,
        ),
    ):
        env = {**os.environ, "HOME": home, "KILN_URL": url, "KILN_TOKEN": token}

        def run(*args: str) -> bool:
            proc = subprocess.run(
                [*kiln_argv(), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                check=False,
            )
            return proc.returncode == 0

        python, _ = timed(
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0,
            RUNS,
        )
        version, version_failed = timed(lambda: run("version"), RUNS)
        help_, help_failed = timed(lambda: run("--help"), RUNS)
        exec_cli, exec_failed = timed(lambda: run("exec", sandbox, "--", "true"), RUNS)
        with Kiln(url, token) as k:
            ref = k.sandboxes.ref(sandbox)
            sdk_stream, _ = timed(lambda: ref.exec_stream(["true"]).wait() == 0, SDK_RUNS, 5)
            sdk_buffered, _ = timed(lambda: ref.exec(["true"]).exit_code == 0, SDK_RUNS, 5)
        # The reference for the SDK's own cost: the same request through bare httpx.
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}) as http:

            def raw() -> bool:
                r = http.post(f"/sandboxes/{sandbox}/exec", json={"cmd": ["true"]})
                return r.status_code == 200 and r.json()["exit_code"] == 0

            raw_httpx, _ = timed(raw, SDK_RUNS, 5)

    where = "configured daemon" if os.environ.get("KILN_BENCH_SANDBOX") else "test daemon"
    print_table(
        f"kiln CLI ({where}; wall time per process, start-up included)",
        [
            Row("python -c pass (interpreter floor)", python),
            Row("kiln version", version, "< 150 ms"),
            Row("kiln --help", help_, "<= 100 ms over the floor"),
            Row("kiln exec SANDBOX -- true", exec_cli, "< 400 ms"),
            Row("SDK exec_stream(['true']) in-process", sdk_stream),
            Row("httpx POST /exec (reference for the SDK)", raw_httpx),
            Row("SDK exec(['true']) in-process", sdk_buffered),
        ],
    )
    print_values(
        "kiln CLI failures",
        [
            ("kiln version failures", f"{version_failed}/{RUNS}", "0"),
            ("kiln --help failures", f"{help_failed}/{RUNS}", "0"),
            ("kiln exec failures", f"{exec_failed}/{RUNS}", "0"),
        ],
    )


if __name__ == "__main__":
    main()
