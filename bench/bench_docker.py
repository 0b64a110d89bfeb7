"""Plain Docker, the reference for kiln's Docker engine: a private dockerd, runc and runsc.

    .venv/bin/python -m bench docker

A private dockerd (kiln.engine.docker) in a network namespace of its own with
kiln's bridge, containers from a busybox image imported from a tarball (no
registry). Everything goes through the Engine API with the ``docker`` SDK, as
the engine will; ``docker exec`` through the CLI is measured too, as a user
sees it. Sections: dockerd start/stop; per runtime: run → first exec, exec
``true``, pause/unpause, idle memory (PSS); runsc checkpoint/restore; and,
when a kiln image is built, overlay2 against vfs with kiln's Debian rootfs.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors

from kiln.engine.docker import Dockerd, DockerdConfig
from kiln.engine.docker.host import cgroup_pids, cmdline, processes_mentioning
from kiln.engine.docker.testing import (
    busybox_rootfs_tar,
    checkpoint,
    import_rootfs,
    private_dockerd,
    start_from_checkpoint,
    unavailable_reason,
)
from kiln.images import find_image

from ._stats import Row, print_table, print_values

REQUIRES: str | None = "root, docker.io and runsc (Debian), busybox-static"

STARTS = 5
RUNS = 10
EXECS = 50
CLI_EXECS = 20
PAUSES = 20
IDLE = 3
CHECKPOINTS = 10
IMAGE = "kiln-bench/busybox:latest"
MIB = 1 << 20


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)  # latencies, ms
    sizes: list[Row] = field(default_factory=list)  # memory, sizes
    values: list[tuple[str, str, str]] = field(default_factory=list)


def skip_reason() -> str | None:
    return unavailable_reason()


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def timed(fn: Callable[[], object], n: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(ms_since(start))
    return out


def exec_true(client: Any, cid: str) -> None:
    exec_id = client.api.exec_create(cid, ["true"])["Id"]
    client.api.exec_start(exec_id)
    assert client.api.exec_inspect(exec_id)["ExitCode"] == 0


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def container_pids(dockerd: Dockerd, cid: str) -> tuple[list[int], list[int]]:
    """(the container's own tasks, its per-container helpers: shim, runsc gofer)."""
    parent = (dockerd.config.cgroup_parent or "").lstrip("/")
    tasks = cgroup_pids(Path(f"/sys/fs/cgroup/memory/{parent}/{cid}"))
    if not tasks:  # cgroup v2
        tasks = cgroup_pids(Path(f"/sys/fs/cgroup/{parent}/{cid}"))
    helpers = [
        pid
        for pid in processes_mentioning(dockerd.config.exec_root)
        if pid not in tasks and any(cid in arg for arg in (cmdline(pid) or []))
    ]
    return tasks, helpers


def cli_argv(dockerd: Dockerd) -> list[str] | None:
    # Debian's 20.10 client when present (this host also has a newer one in /usr/local).
    exe = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    return None if exe is None else [exe, "-H", dockerd.url]


def bench_lifecycle(rows: list[Row]) -> None:
    """Dockerd.start (containerd, then dockerd, until /info answers) and stop, fresh roots."""
    ns = f"kd-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    starts, stops = [], []
    try:
        for _ in range(STARTS):
            root = Path(tempfile.mkdtemp(prefix="kiln-bench-dockerd-"))
            daemon = Dockerd(DockerdConfig(root=root, netns=ns))
            try:
                start = time.perf_counter()
                daemon.start()
                starts.append(ms_since(start))
            finally:
                start = time.perf_counter()
                daemon.stop()
                stops.append(ms_since(start))
                shutil.rmtree(root, ignore_errors=True)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    rows.append(Row("dockerd start: containerd + dockerd → /info", starts))
    rows.append(Row("dockerd stop (idle), leftovers checked", stops))


def bench_runtime(dockerd: Dockerd, client: Any, runtime: str, report: Report) -> str:
    rows, sizes, values = report.rows, report.sizes, report.values
    run_ms, first_exec_ms, total_ms, rm_ms = [], [], [], []
    for _ in range(RUNS):
        start = time.perf_counter()
        c = client.containers.run(IMAGE, ["sleep", "1000"], runtime=runtime, detach=True)
        run_ms.append(ms_since(start))
        t = time.perf_counter()
        exec_true(client, c.id)
        first_exec_ms.append(ms_since(t))
        total_ms.append(ms_since(start))
        t = time.perf_counter()
        c.remove(force=True)
        rm_ms.append(ms_since(t))
    rows.append(Row(f"{runtime}: run -d (create + start)", run_ms))
    rows.append(Row(f"{runtime}:   then first exec true", first_exec_ms))
    rows.append(Row(f"{runtime}: run -d → first exec done", total_ms))
    rows.append(Row(f"{runtime}: rm -f (running)", rm_ms))

    c = client.containers.run(IMAGE, ["sleep", "1000"], runtime=runtime, detach=True)
    rows.append(
        Row(f"{runtime}: exec true (Engine API)", timed(lambda: exec_true(client, c.id), EXECS))
    )
    cli = cli_argv(dockerd)
    if cli is not None:
        argv = [*cli, "exec", c.id, "true"]
        samples = timed(lambda: subprocess.run(argv, check=True, capture_output=True), CLI_EXECS)
        rows.append(Row(f"{runtime}: docker exec true (CLI)", samples))
    pause, unpause, after = [], [], []
    refused = 0
    for _ in range(PAUSES):
        t = time.perf_counter()
        client.api.pause(c.id)
        pause.append(ms_since(t))
        t = time.perf_counter()
        client.api.unpause(c.id)
        unpause.append(ms_since(t))
        t = time.perf_counter()
        while True:  # dockerd 20.10 clears "paused" when containerd's event arrives
            try:
                exec_true(client, c.id)
                break
            except docker.errors.APIError as exc:
                if "is paused" not in str(exc.explanation):
                    raise
                refused += 1
        after.append(ms_since(t))
    rows.append(Row(f"{runtime}: pause", pause))
    rows.append(Row(f"{runtime}: unpause", unpause))
    rows.append(Row(f"{runtime}:   then exec true (retried while 'paused')", after))
    values.append((f"{runtime}: exec refused right after unpause", f"{refused} times", ""))
    c.remove(force=True)

    # All measured while all run: PSS splits shared pages (the shim's, runsc's
    # binary) among the processes mapping them.
    idle = [
        client.containers.run(IMAGE, ["sleep", "1000"], runtime=runtime, detach=True)
        for _ in range(IDLE)
    ]
    time.sleep(2)  # let the runtimes settle
    own, total = [], []
    lines = []
    for c in idle:
        tasks, helpers = container_pids(dockerd, c.id)
        own_kib = sum(pss_kib(p) for p in tasks)
        helper_kib = sum(pss_kib(p) for p in helpers)
        own.append(own_kib / 1024)
        total.append((own_kib + helper_kib) / 1024)
        names = sorted(
            {((cmdline(p) or ["(no argv)"])[0]).rsplit("/", 1)[-1] for p in tasks + helpers}
        )
        lines.append(", ".join(names))
    for c in idle:
        c.remove(force=True)
    sizes.append(Row(f"{runtime}: idle PSS, container cgroup (MiB), {IDLE} up", own))
    sizes.append(Row(f"{runtime}: idle PSS, + shim (+ gofer) (MiB), {IDLE} up", total))
    return lines[0]


def bench_checkpoint(dockerd: Dockerd, client: Any, report: Report) -> None:
    rows, sizes, values = report.rows, report.sizes, report.values
    c = client.containers.run(IMAGE, ["sleep", "1000"], runtime="runsc", detach=True)
    exec_true(client, c.id)
    create_ms, restore_ms, first_ms, kib = [], [], [], []
    failures: list[str] = []
    for i in range(CHECKPOINTS):
        name = f"cp{i}"
        t = time.perf_counter()
        checkpoint(client, dockerd, c.id, name)  # until exited, runsc's state cleared
        create_ms.append(ms_since(t))
        folder = dockerd.config.data_root / "containers" / c.id / "checkpoints" / name
        kib.append(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1024)
        t = time.perf_counter()
        for attempt in range(5):
            try:
                start_from_checkpoint(client, c.id, name)
                break
            except docker.errors.APIError as exc:
                failures.append(str(exc.explanation)[:120])
                if attempt == 4:
                    raise
                time.sleep(0.1)
        restore_ms.append(ms_since(t))
        t = time.perf_counter()
        exec_true(client, c.id)
        first_ms.append(ms_since(t))
    c.remove(force=True)
    rows.append(Row("runsc: checkpoint create (until exited, state cleared)", create_ms))
    rows.append(Row("runsc: start --checkpoint (incl. retries)", restore_ms))
    rows.append(Row("runsc:   then first exec true", first_ms))
    sizes.append(Row("runsc: checkpoint size (KiB)", kib))
    values.append(
        (
            "runsc restores refused and retried",
            f"{len(failures)} of {CHECKPOINTS + len(failures)}",
            "",
        )
    )
    for msg in sorted(set(failures)):
        values.append(("  refusal", msg[:60], ""))


def debian_rootfs_tar(workdir: Path) -> Path | None:
    """kiln's own rootfs as a tarball (debugfs rdump of rootfs.ext4: no mount needed)."""
    image = find_image("minimal")
    if image is None or shutil.which("debugfs") is None:
        return None
    tree = workdir / "rootfs"
    tree.mkdir()
    subprocess.run(
        ["debugfs", "-R", f"rdump / {tree}", str(image.path / "rootfs.ext4")],
        check=True,
        capture_output=True,
    )
    tar = workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(tar), "."], check=True)
    shutil.rmtree(tree)
    return tar


def du_mib(path: Path) -> float:
    out = subprocess.run(
        ["du", "-sxk", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[0]) / 1024


def bench_storage(report: Report) -> None:
    rows, values = report.rows, report.values
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-docker-"))
    try:
        tar = debian_rootfs_tar(work)
        if tar is None:
            values.append(("overlay2 vs vfs", "skipped: no kiln image", ""))
            return
        for driver in ("overlay2", "vfs"):
            root = work / driver
            with (
                private_dockerd(root, subnet=None, storage_driver=driver) as d,
                contextlib.closing(d.client(timeout=600)) as client,
            ):
                t = time.perf_counter()
                client.api.import_image_from_file(
                    str(tar), repository="kiln-bench/debian", tag="latest"
                )
                values.append(
                    (f"{driver}: docker import of kiln's rootfs", f"{ms_since(t):.0f} ms", "")
                )
                before = du_mib(d.config.data_root)
                runs = []
                made = []
                for _ in range(3):
                    t = time.perf_counter()
                    made.append(
                        client.containers.run(
                            "kiln-bench/debian:latest", ["sleep", "1000"], detach=True
                        )
                    )
                    runs.append(ms_since(t))
                rows.append(Row(f"{driver}: run -d, kiln's Debian rootfs", runs))
                values.append(
                    (
                        f"{driver}: disk per container",
                        f"{(du_mib(d.config.data_root) - before) / 3:.1f} MiB",
                        "",
                    )
                )
                if driver == "overlay2":
                    for runtime in ("runc", "runsc"):
                        total = []
                        for _ in range(5):
                            t = time.perf_counter()
                            c = client.containers.run(
                                "kiln-bench/debian:latest",
                                ["sleep", "1000"],
                                runtime=runtime,
                                detach=True,
                            )
                            exec_true(client, c.id)
                            total.append(ms_since(t))
                            made.append(c)
                        rows.append(Row(f"{runtime}: run -d → first exec, kiln's rootfs", total))
                for c in made:
                    c.remove(force=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    report = Report()
    bench_lifecycle(report.rows)
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-dockerd-"))
    try:
        with private_dockerd(root) as d, contextlib.closing(d.client()) as client:
            wrapped = "yes" if d.runsc_wrapped else "no"
            report.values.append(
                ("dockerd version; runsc through the wrapper", f"{d.info.version}; {wrapped}", "")
            )
            import_rootfs(client, busybox_rootfs_tar(), IMAGE)
            for runtime in ("runc", "runsc"):
                processes = bench_runtime(d, client, runtime, report)
                report.values.append((f"{runtime}: processes per idle container", "", processes))
            bench_checkpoint(d, client, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bench_storage(report)
    print_table("plain Docker (private dockerd, Engine API via the docker SDK)", report.rows)
    print_table("plain Docker: memory and sizes", report.sizes, unit="MiB; checkpoint size in KiB")
    print_values("plain Docker: single values", report.values)


if __name__ == "__main__":
    main()
