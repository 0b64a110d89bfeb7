"""The E2B control plane: the unmodified ``e2b`` SDK against kiln's own SDK, same daemon,
same run, calls alternated so both see the same machine load.

    .venv/bin/python -m bench.bench_e2b_control

Part 1 runs the real API (uvicorn + FastAPI + services + SQLite, the server in a
thread) over a fake engine of states only: no VM and no agent, so the rows are
what each client and its routes cost: create + kill, info, list of 20.

Part 2 (root, QEMU and a built image): ``Sandbox.create()`` against
``k.sandboxes.create()`` on real microVMs (restored from the shape's template),
with the sandbox network in a network namespace this benchmark creates and
deletes. The E2B create also asks the guest for its ``user`` account.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._harness import agent_skip_reason, ms_since, vm_live_server, vm_skip_reason
from ._stats import Row, print_table

REQUIRES: str | None = "the e2b SDK; for part 2 root, QEMU, a built image"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

N = 100
VM_N = 8


def skip_reason() -> str | None:
    try:
        import e2b  # noqa: F401, PLC0415
    except ImportError:
        return "the e2b SDK is not installed (pip install 'e2b>=2,<3')"
    return agent_skip_reason()


@contextmanager
def sdk_env(url: str, key: str) -> Iterator[None]:
    """The E2B SDK's three variables, as a user sets them."""
    names = {
        "E2B_API_URL": url + "/e2b",
        "E2B_SANDBOX_URL": url + "/e2b/envd",
        "E2B_API_KEY": key,
    }
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def alternate(
    a: Callable[[], object], b: Callable[[], object], n: int, warmup: int = 3
) -> tuple[list[float], list[float]]:
    """``n`` timed runs of each, a and b in turn."""
    for _ in range(warmup):
        a()
        b()
    sa: list[float] = []
    sb: list[float] = []
    for _ in range(n):
        for fn, samples in ((a, sa), (b, sb)):
            start = time.perf_counter()
            fn()
            samples.append(ms_since(start))
    return sa, sb


def compare(
    server: Any, n: int, *, only_create: bool = False
) -> dict[str, tuple[list[float], list[float]]]:
    """(e2b, kiln) samples per operation, on ``server`` (a started LiveServer)."""
    from e2b import Sandbox  # noqa: PLC0415

    from kiln.sdk import Kiln  # noqa: PLC0415

    _, key = server.store.create_user(f"bench-{secrets.token_hex(3)}")
    out: dict[str, tuple[list[float], list[float]]] = {}
    with sdk_env(server.url, key), Kiln(server.url, key) as k:
        out["create + kill"] = alternate(
            lambda: Sandbox.create().kill(), lambda: k.sandboxes.create().delete(), n
        )
        if only_create:
            return out
        e2b_sb = Sandbox.create()
        kiln_sb = k.sandboxes.create()
        out["info of one sandbox"] = alternate(
            e2b_sb.get_info, lambda: k.sandboxes.get(kiln_sb.id), n
        )
        extra = [k.sandboxes.create() for _ in range(18)]
        out["list of 20 sandboxes"] = alternate(
            lambda: Sandbox.list().next_items(), k.sandboxes.list, n
        )
        for sb in (*extra, kiln_sb):
            sb.delete()
        e2b_sb.kill()
    return out


def rows(results: dict[str, tuple[list[float], list[float]]]) -> list[Row]:
    out = []
    for name, (e2b_samples, kiln_samples) in results.items():
        out.append(Row(f"{name}: kiln SDK (reference)", kiln_samples))
        out.append(Row(f"{name}: e2b SDK, /e2b", e2b_samples))
    return out


def part1() -> None:
    from fakes.engine import FakeEngine  # noqa: PLC0415
    from server.harness import LiveServer  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="kbe2b-"))
    server = LiveServer(root, engine_factory=lambda _: FakeEngine())
    try:
        server.start()
        results = compare(server, N)
    finally:
        if server.url:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_table("E2B control plane vs kiln's API, fake engine (no VM)", rows(results))


def part2() -> None:
    with vm_live_server(bridge="kbe2b0", subnet="10.213.78.0/24") as server:
        results = compare(server, VM_N, only_create=True)
    print_table("E2B control plane vs kiln's API, real microVMs (QEMU)", rows(results))


def main() -> None:
    part1()
    reason = vm_skip_reason()
    if reason is not None:
        print(f"\n(part 2, real microVMs, skipped: {reason})")
        return
    part2()


if __name__ == "__main__":
    main()
