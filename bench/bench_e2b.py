"""The E2B-compatible API vs kiln's own SDK, on the same daemon and the same sandbox.

    .venv/bin/python -m bench.bench_e2b

The unmodified ``e2b`` SDK (sync) and kiln's SDK drive one daemon (the real
API under uvicorn in a thread, over SQLite), calls alternating so both see the
same load:

Part 1 (fake engine, a real test-mode agent per sandbox, no VM): what the
Connect layer and the process service add, without a guest kernel's noise.

Part 2 (root, QEMU, a built image; the sandbox network in a namespace this
benchmark makes and deletes): the same on a real microVM, and ``Sandbox.create()``
vs ``k.sandboxes.create()``.

Rows, per part:

- ``kiln exec true``: kiln's SDK, ``sb.exec(["true"])`` (the reference);
- ``kiln exec bash -l -c true``: the same work the E2B SDK asks the guest for
  (``commands.run`` always runs ``/bin/bash -l -c CMD``);
- ``e2b commands.run("true")``: the E2B SDK, start stream to end event.

The goal is e2b <= 1.3 x kiln exec on the same sandbox.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._harness import agent_skip_reason, ms_since, vm_live_server, vm_skip_reason
from ._stats import Row, print_table, print_values

REQUIRES: str | None = (
    "the e2b SDK; the guest agent in --test-mode; for part 2 root, QEMU, an image"
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

#: The E2B SDK's variables, as a user sets them.
E2B_VARS = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")


def skip_reason() -> str | None:
    try:
        import e2b  # noqa: F401, PLC0415
    except ImportError:
        return "the e2b SDK is not installed (it is a dev dependency)"
    return agent_skip_reason()


@contextmanager
def e2b_env(url: str, key: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in E2B_VARS}
    os.environ.update(
        {"E2B_API_URL": url + "/e2b", "E2B_SANDBOX_URL": url + "/e2b/envd", "E2B_API_KEY": key}
    )
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rounds(fns: list[Callable[[], None]], n: int, warmup: int) -> list[list[float]]:
    """Each of ``fns`` in turn, ``warmup + n`` times; the last ``n`` timings of each."""
    out: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + n):
        for samples, fn in zip(out, fns, strict=True):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                samples.append(ms_since(start))
    return out


def exec_rows(url: str, key: str, n: int, warmup: int) -> list[Row]:
    """Both SDKs on one sandbox the E2B SDK created."""
    from e2b import Sandbox  # noqa: PLC0415

    from kiln.sdk import Kiln  # noqa: PLC0415

    with e2b_env(url, key):
        e2b_sb = Sandbox.create(timeout=3600)
    kiln = Kiln(url, key)
    try:
        kiln_sb = kiln.sandboxes.get(e2b_sb.sandbox_id)

        def kiln_true() -> None:
            assert kiln_sb.exec(["true"]).exit_code == 0

        def kiln_bash() -> None:
            assert kiln_sb.exec(["/bin/bash", "-l", "-c", "true"]).exit_code == 0

        def e2b_true() -> None:
            assert e2b_sb.commands.run("true").exit_code == 0

        plain, bash, e2b = rounds([kiln_true, kiln_bash, e2b_true], n, warmup)
    finally:
        e2b_sb.kill()
        kiln.close()
    return [
        Row("kiln exec true (reference)", plain),
        Row("kiln exec bash -l -c true", bash),
        Row('e2b commands.run("true")', e2b, "<= 1.3x kiln exec"),
    ]


def create_rows(url: str, key: str, n: int) -> list[Row]:
    from e2b import Sandbox  # noqa: PLC0415

    from kiln.sdk import Kiln  # noqa: PLC0415

    kiln = Kiln(url, key, timeout=600)
    made: list[Any] = []

    def kiln_create() -> None:
        made.append(kiln.sandboxes.create())

    def e2b_create() -> None:
        with e2b_env(url, key):
            made.append(Sandbox.create())

    try:
        kiln_ms, e2b_ms = rounds([kiln_create, e2b_create], n, 1)
    finally:
        for sb in made:
            with_kill = getattr(sb, "kill", None)
            if with_kill is not None:
                with_kill()
            else:
                sb.delete()
        kiln.close()
    return [
        Row("k.sandboxes.create() (reference)", kiln_ms),
        Row("e2b Sandbox.create()", e2b_ms),
    ]


def ratios(rows: list[Row]) -> list[tuple[str, str, str]]:
    by = {r.name: r.pct(50) for r in rows}
    e2b = by['e2b commands.run("true")']
    return [
        ("e2b / kiln exec true, p50", f"{e2b / by['kiln exec true (reference)']:.2f}x", "<= 1.3x"),
        (
            "e2b / kiln exec bash -l -c true, p50",
            f"{e2b / by['kiln exec bash -l -c true']:.2f}x",
            "",
        ),
    ]


def part1() -> None:
    from server.harness import LiveServer  # noqa: PLC0415 -- the test harness, on sys.path

    root = Path(tempfile.mkdtemp(prefix="kbe2b-"))
    server = LiveServer(root).start()
    try:
        _, key = server.store.create_user("bench")
        rows = exec_rows(server.url, key, n=60, warmup=10)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_table("E2B SDK vs kiln SDK (fake engine + real test-mode agent, no VM)", rows)
    print_values("ratios (no VM)", ratios(rows))


def part2() -> None:
    with vm_live_server(bridge="kbe2b0", subnet="10.213.78.0/24") as server:
        _, key = server.store.create_user("bench")
        rows = exec_rows(server.url, key, n=60, warmup=5)
        creates = create_rows(server.url, key, n=6)
    print_table("E2B SDK vs kiln SDK on a real microVM (QEMU, own network namespace)", rows)
    print_values("ratios (microVM)", ratios(rows))
    print_table("create: E2B SDK vs kiln SDK (microVM)", creates)


def main() -> None:
    part1()
    reason = vm_skip_reason()
    if reason is not None:
        print(f"\n(part 2, real microVMs, skipped: {reason})")
        return
    part2()


if __name__ == "__main__":
    main()
