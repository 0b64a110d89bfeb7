"""Reverse proxy: what the daemon's proxy adds over the agent's forward channel alone.

    scripts/bench proxy          (inside a network namespace of its own)
    .venv/bin/python -m bench proxy

A real web service runs "inside the sandbox" (Python's stdlib ``http.server``
speaking HTTP/1.1 with keep-alive, started through the API as a background
process) and is reached every way below in the same run, interleaved so every
row sees the same load:

- reference: ``AgentClient.forward(port)`` on the daemon's own event loop, a
  raw HTTP/1.1 request written and the whole response read, over a new forward
  per request and over one kept-alive forward (the like-for-like comparison
  with the proxy, which pools its forwards);
- kiln: ``GET /sandboxes/{id}/proxy/{port}/...`` with a keep-alive httpx client;
- kiln: the published host (``Host: <alias>.localhost:<port>``, no key);
- floor: ``GET /health`` with the same client (what any request to the daemon costs).

The kiln rows' client runs in a process of its own, as the daemon's clients
do: in this process it would share the GIL with the daemon's thread.

Targets (printed as PASS/MISS, not asserted): the proxy adds ≤ 2 ms p50 to a
small GET; a 100 MB download through the proxy runs at ≥ 50 % of the forward
channel's own throughput; 100 concurrent small GETs through the proxy all
succeed (their latency is printed beside 100 concurrent raw forwards).

Part 1 runs the daemon test harness (the real API under uvicorn in a thread,
the fake engine with a real test-mode agent that shares the host's network).
Part 2 (root, QEMU, a built image) repeats it on a real microVM, with the
sandbox network in a namespace this benchmark creates and deletes.

``KILN_BENCH_PROXY_MB`` sets the download size (default 100);
``KILN_BENCH_PROXY_NAGLE=1`` leaves Nagle's algorithm on in the service (see
SERVICE); ``KILN_BENCH_PROXY_PROFILE=1`` prints a cProfile of the daemon's
event loop thread during proxied small GETs, a download and bursts.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import os
import pstats
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ._harness import agent_skip_reason, ms_since, vm_skip_reason
from ._stats import Row, print_table, print_values

REQUIRES: str | None = "the guest agent in --test-mode; for part 2 root, QEMU, a built image"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MB = 1_000_000
BIG_MB = int(os.environ.get("KILN_BENCH_PROXY_MB", "100"))
PROFILE = os.environ.get("KILN_BENCH_PROXY_PROFILE", "") not in ("", "0")
#: "1": the service keeps Nagle's algorithm on (http.server's default); see SERVICE.
NAGLE = os.environ.get("KILN_BENCH_PROXY_NAGLE", "0")
SMALL_BYTES = 1024
CONCURRENT = 100
ALIAS = "bench"

#: The service in the sandbox: stdlib only (the guest image has python3 and no
#: packages). ``python3 -m http.server`` itself would not do: it answers HTTP/1.0
#: (a new connection per request, nothing to pool), listens with a backlog of 5
#: (a burst of 100 connections overflows it) and keeps Nagle's algorithm on, so
#: its two writes per response (headers, then body) stall 40 ms on a delayed ACK
#: whenever requests come back to back on a kept-alive connection, proxied or
#: not (KILN_BENCH_PROXY_NAGLE=1 shows it). Async servers (uvicorn, Node) set
#: TCP_NODELAY, as this one does.
SERVICE = """\
import http.server, os, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = os.environ.get("NAGLE") != "1"

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 512

os.chdir(sys.argv[2])
Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def skip_reason() -> str | None:
    return agent_skip_reason()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Settings:
    """How much of each measurement one part runs."""

    title: str
    n: int  # small GETs per row
    warmup: int
    downloads: int  # 100 MB downloads per row
    rounds: int  # rounds of CONCURRENT concurrent GETs
    python: str  # the sandbox's Python
    service_dir: Callable[[Any, str], str]  # (server, sandbox id) -> dir in the sandbox
    port: Callable[[], int]


# ----------------------------------------------------------------- raw HTTP/1.1


def raw_get(host: str, path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def read_response(reader: asyncio.StreamReader, chunk: int = 1 << 20) -> tuple[int, int]:
    """Read one HTTP/1.1 response with a Content-Length; (status, body length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = -1
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length < 0:
        raise AssertionError(f"no Content-Length: {head[:300]!r}")
    left = length
    while left:
        data = await reader.read(min(left, chunk))
        if not data:
            raise AssertionError(f"response ended {left} bytes early")
        left -= len(data)
    return status, length


async def forward_get(stream: Any, port: int, path: str) -> int:
    """A GET over a ForwardStream; the body length (AssertionError unless 200)."""
    await stream.send(raw_get(f"127.0.0.1:{port}", path))
    status, length = await read_response(stream.reader)
    assert status == 200, status
    return length


class LoadClient:
    """The kiln rows' HTTP client, in a process of its own as the daemon's clients are
    (in this process it would share the GIL with the daemon's thread and slow both).
    One JSON line per command each way; the client times its own requests."""

    def __init__(self, url: str, key: str, published_host: str) -> None:
        code = "from bench.bench_proxy import client_main; client_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, url, key, published_host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process ended ({self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"{op} {args}: {answer['error']}")
        return answer

    def get(self, via: str, path: str) -> float:
        return float(self.ask("get", via=via, path=path)["ms"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client_main() -> None:
    """The client process: ``URL KEY PUBLISHED_HOST``, commands on stdin."""
    url, key, published_host = sys.argv[1:4]
    auth = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=url, headers=auth, timeout=600) as api,
        httpx.Client(base_url=url, headers={"Host": published_host}, timeout=600) as published,
    ):
        clients = {"api": api, "published": published}
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "get":
                    answer = _client_get(clients[cmd["via"]], cmd["path"])
                elif cmd["op"] == "download":
                    answer = _client_download(api, cmd["path"])
                else:
                    burst = asyncio.run(
                        _client_burst(url, key, cmd["path"], cmd["size"], cmd["rounds"])
                    )
                    answer = asdict(burst)
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)


def _client_get(http: httpx.Client, path: str) -> dict[str, Any]:
    start = time.perf_counter()
    r = http.get(path)
    elapsed = ms_since(start)
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:200]}"}
    return {"ms": elapsed, "size": len(r.content)}


def _client_download(http: httpx.Client, path: str) -> dict[str, Any]:
    start = time.perf_counter()
    size = 0
    with http.stream("GET", path) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {r.read()[:200]!r}"}
        for chunk in r.iter_raw():
            size += len(chunk)
    return {"s": time.perf_counter() - start, "size": size}


@dataclass
class Burst:
    latencies: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _client_burst(url: str, key: str, path: str, size: int | None, rounds: int) -> Burst:
    """``rounds`` bursts of CONCURRENT simultaneous GETs, each on a kept-alive
    connection of its own to the daemon, after a warm-up burst that opens them.

    Raw HTTP/1.1 on asyncio streams rather than httpx: httpx's AsyncClient spends
    over a second of its own CPU on a burst of 100 (its pool rescans every
    connection for each request), which would hide what the daemon does."""
    out = Burst()
    host, _, port = url.removeprefix("http://").rpartition(":")
    request = raw_get(f"{host}:{port}", path, f"Authorization: Bearer {key}")
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = [None] * CONCURRENT

    async def one(i: int) -> float | None:
        start = time.perf_counter()
        try:
            conn = conns[i]
            if conn is None:
                conn = conns[i] = await asyncio.open_connection(host, int(port))
            conn[1].write(request)
            status, length = await read_response(conn[0])
        except (OSError, asyncio.IncompleteReadError, AssertionError) as exc:
            out.errors.append(f"{type(exc).__name__}: {exc}")
            conns[i] = None
            return None
        if status != 200 or size not in (None, length):
            out.errors.append(f"status {status}, {length} bytes")
            return None
        return ms_since(start)

    try:
        for r in range(rounds + 1):
            start = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
            total = ms_since(start)
            if r > 0:
                out.totals.append(total)
                out.latencies.extend(x for x in results if x is not None)
    finally:
        for conn in conns:
            if conn is not None:
                conn[1].close()
    return out


@dataclass
class Sandbox:
    """One sandbox with the service running; the forward-channel references run on the
    daemon's own event loop through its agent client."""

    server: Any
    sid: str
    port: int
    client: Any = None  # the daemon's AgentClient for the sandbox
    kept: Any = None  # a kept-alive ForwardStream

    def __post_init__(self) -> None:
        self.client = self.server.call(lambda: self.server.engine.agent(self.sid))

    @property
    def proxy_path(self) -> str:
        return f"/sandboxes/{self.sid}/proxy/{self.port}"

    def forward_fresh(self, path: str) -> float:
        async def once() -> float:
            start = time.perf_counter()
            async with await self.client.forward(self.port) as stream:
                size = await forward_get(stream, self.port, path)
            elapsed = ms_since(start)
            assert size == SMALL_BYTES, size
            return elapsed

        return float(self.server.call(once))

    def forward_kept(self, path: str) -> float:
        async def once() -> float:
            if self.kept is None:
                self.kept = await self.client.forward(self.port)
            start = time.perf_counter()
            size = await forward_get(self.kept, self.port, path)
            elapsed = ms_since(start)
            assert size == SMALL_BYTES, size
            return elapsed

        return float(self.server.call(once))

    def close_kept(self) -> None:
        if self.kept is not None:
            kept, self.kept = self.kept, None
            self.server.call(kept.aclose)

    def download(self, path: str) -> float:
        """Seconds to read the big file over a fresh raw forward."""

        async def once() -> float:
            start = time.perf_counter()
            async with await self.client.forward(self.port) as stream:
                size = await forward_get(stream, self.port, path)
            assert size == BIG_MB * MB, size
            return time.perf_counter() - start

        return float(self.server.call(once, timeout=600))

    def burst(self, path: str, rounds: int) -> Burst:
        """Like the client's bursts, each GET over a fresh forward of its own."""
        out = Burst()

        async def one() -> float | None:
            start = time.perf_counter()
            try:
                async with await self.client.forward(self.port) as stream:
                    size = await forward_get(stream, self.port, path)
                assert size == SMALL_BYTES, size
            except Exception as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
                return None
            return ms_since(start)

        async def gather() -> tuple[float, list[float | None]]:
            start = time.perf_counter()
            results = await asyncio.gather(*(one() for _ in range(CONCURRENT)))
            return ms_since(start), list(results)

        for i in range(rounds + 1):
            total, results = self.server.call(gather, timeout=600)
            if i > 0:
                out.totals.append(total)
                out.latencies.extend(x for x in results if x is not None)
        return out


def start_service(
    server: Any, http: httpx.Client, sid: str, s: Settings, pids: list[int]
) -> Sandbox:
    """The service in sandbox ``sid`` (its pid appended to ``pids``), with the small and
    the big file, published as ALIAS."""
    port = s.port()
    base = s.service_dir(server, sid)
    www = f"{base}/www"

    def run(cmd: list[str]) -> None:
        r = http.post(f"/sandboxes/{sid}/exec", json={"cmd": cmd})
        assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text

    def put(path: str, data: bytes) -> None:
        r = http.put(f"/sandboxes/{sid}/files", params={"path": path}, content=data)
        assert r.status_code == 200, r.text

    run(["mkdir", "-p", www])
    put(f"{base}/serve.py", SERVICE.encode())
    put(f"{www}/small", b"s" * SMALL_BYTES)
    run(["truncate", "-s", str(BIG_MB * MB), f"{www}/big"])  # sparse: no disk, no RAM
    cmd = [s.python, f"{base}/serve.py", str(port), www]
    r = http.post(f"/sandboxes/{sid}/processes", json={"cmd": cmd, "env": {"NAGLE": NAGLE}})
    assert r.status_code == 201, r.text
    pids.append(r.json()["pid"])
    r = http.post(f"/sandboxes/{sid}/publish", json={"port": port, "alias": ALIAS})
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 60
    while True:  # 502 until the service listens
        r = http.get(f"/sandboxes/{sid}/proxy/{port}/small")
        if r.status_code == 200:
            return Sandbox(server, sid, port)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not come up: {r.status_code} {r.text[:200]}")
        time.sleep(0.1)


# ------------------------------------------------------------------------ measurements


def small_get_rows(sb: Sandbox, load: LoadClient, s: Settings) -> dict[str, list[float]]:
    """Every way to GET the small file, in turns (each row sees the same load)."""
    ways: dict[str, Callable[[], float]] = {
        "fresh": lambda: sb.forward_fresh("/small"),
        "kept": lambda: sb.forward_kept("/small"),
        "proxy": lambda: load.get("api", f"{sb.proxy_path}/small"),
        "published": lambda: load.get("published", "/small"),
        "health": lambda: load.get("api", "/health"),
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for i in range(s.warmup + s.n):
            for name, fn in ways.items():
                elapsed = fn()
                if i >= s.warmup:
                    samples[name].append(elapsed)
    finally:
        sb.close_kept()
    return samples


def download_proxy(sb: Sandbox, load: LoadClient) -> float:
    answer = load.ask("download", path=f"{sb.proxy_path}/big")
    assert answer["size"] == BIG_MB * MB, answer
    return float(answer["s"])


def download_rows(sb: Sandbox, load: LoadClient, s: Settings) -> tuple[list[float], list[float]]:
    sb.download("/big")  # warm-up: the file's pages, both relay paths
    download_proxy(sb, load)
    ref: list[float] = []
    kiln: list[float] = []
    for _ in range(s.downloads):
        ref.append(sb.download("/big"))
        kiln.append(download_proxy(sb, load))
    return ref, kiln


def burst_rows(sb: Sandbox, load: LoadClient, s: Settings) -> dict[str, Burst]:
    """The reference, the proxy and the daemon's floor (GET /health, same client)."""
    return {
        "ref": sb.burst("/small", s.rounds),
        "proxy": Burst(
            **load.ask("burst", path=f"{sb.proxy_path}/small", size=SMALL_BYTES, rounds=s.rounds)
        ),
        "health": Burst(**load.ask("burst", path="/health", size=None, rounds=s.rounds)),
    }


def profile_proxy(server: Any, sb: Sandbox, load: LoadClient) -> None:
    """cProfile of the daemon's event loop thread while only proxied traffic runs."""
    for title, work in (
        (
            "300 proxied small GETs",
            lambda: [load.get("api", f"{sb.proxy_path}/small") for _ in range(300)],
        ),
        (f"one {BIG_MB} MB proxied download", lambda: download_proxy(sb, load)),
        (
            f"3 bursts of {CONCURRENT} proxied GETs",
            lambda: load.ask("burst", path=f"{sb.proxy_path}/small", size=SMALL_BYTES, rounds=2),
        ),
    ):
        prof = cProfile.Profile()

        async def enable(prof: cProfile.Profile = prof) -> None:
            prof.enable()

        async def disable(prof: cProfile.Profile = prof) -> None:
            prof.disable()

        server.call(enable)
        try:
            work()
        finally:
            server.call(disable)
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumtime").print_stats(30)
        print(f"\n## profile of the daemon's loop thread: {title}\n{out.getvalue()}")


# ----------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    s: Settings,
    small: dict[str, list[float]],
    downloads: tuple[list[float], list[float]],
    bursts: dict[str, Burst],
) -> None:
    fresh, kept = Row("", small["fresh"]), Row("", small["kept"])
    proxy, published = Row("", small["proxy"]), Row("", small["published"])
    print_table(
        f"Small GET ({SMALL_BYTES} B), {s.title}",
        [
            Row("ref: raw GET over a new forward", small["fresh"]),
            Row("ref: raw GET over a kept-alive forward", small["kept"]),
            Row("proxy: GET /sandboxes/{id}/proxy/{port}/", small["proxy"], "≤ ref + 2 ms p50"),
            Row("published: GET, Host <alias>.localhost", small["published"], "≤ ref + 2 ms p50"),
            Row("floor: GET /health, same httpx client", small["health"]),
        ],
    )
    values: list[tuple[str, str, str]] = []
    for name, row in (("proxy", proxy), ("published", published)):
        for ref_name, ref in (("kept-alive forward", kept), ("new forward", fresh)):
            for p in (50, 95, 99):
                added = row.pct(p) - ref.pct(p)
                target = f"≤ 2 ms: {verdict(added <= 2)}" if p == 50 else ""
                values.append((f"{name} minus {ref_name}, p{p}", f"{added:+.3f} ms", target))
    print_values(f"Added to a small GET (differences of percentiles), {s.title}", values)

    ref_s, kiln_s = downloads
    ref_mbs = [BIG_MB / t for t in ref_s]
    kiln_mbs = [BIG_MB / t for t in kiln_s]
    ratio = Row("", kiln_mbs).pct(50) / Row("", ref_mbs).pct(50)
    print_table(
        f"{BIG_MB} MB download, {s.title}",
        [
            Row("ref: raw GET over a new forward", [t * 1000 for t in ref_s]),
            Row("proxy: GET, httpx streamed", [t * 1000 for t in kiln_s]),
        ],
    )

    def spread(xs: list[float]) -> str:
        return f"{Row('', xs).pct(50):.0f} ({min(xs):.0f}-{max(xs):.0f})"

    print_values(
        f"{BIG_MB} MB download throughput in MB/s: median (min-max) of {len(ref_s)}",
        [
            ("ref: raw forward", spread(ref_mbs), ""),
            ("proxy", spread(kiln_mbs), ""),
            (
                "proxy / forward (medians)",
                f"{ratio * 100:.0f} %",
                f"≥ 50 %: {verdict(ratio >= 0.5)}",
            ),
        ],
    )

    ref_b, kiln_b, floor_b = bursts["ref"], bursts["proxy"], bursts["health"]
    print_table(
        f"{CONCURRENT} concurrent small GETs, {s.title}, {len(kiln_b.totals)} bursts",
        [
            Row("ref: each over a new forward", ref_b.latencies),
            Row("proxy: each request", kiln_b.latencies, "no errors"),
            Row("floor: each GET /health, same client", floor_b.latencies),
            Row("ref: whole burst", ref_b.totals),
            Row("proxy: whole burst", kiln_b.totals),
            Row("floor: whole burst of GET /health", floor_b.totals),
        ],
    )
    requests = CONCURRENT * len(kiln_b.totals)
    values = []
    for label, burst in (("ref", ref_b), ("proxy", kiln_b), ("floor", floor_b)):
        target = f"= 0: {verdict(not burst.errors)}" if label == "proxy" else ""
        values.append((f"{label}: errors", f"{len(burst.errors)} of {requests}", target))
        for message in sorted(set(burst.errors))[:3]:
            count = burst.errors.count(message)
            values.append((f"  {label} error ({count}x)", message[:60], ""))
    print_values(f"{CONCURRENT} concurrent small GETs: errors, {s.title}", values)

    added_kept = proxy.pct(50) - kept.pct(50)
    added_fresh = proxy.pct(50) - fresh.pct(50)
    added_published = published.pct(50) - kept.pct(50)
    print_values(
        f"Targets, {s.title}",
        [
            (
                "small GET: proxy adds, p50 (kept-alive ref)",
                f"{added_kept:+.3f} ms",
                f"≤ 2 ms: {verdict(added_kept <= 2)}",
            ),
            (
                "small GET: proxy adds, p50 (new-forward ref)",
                f"{added_fresh:+.3f} ms",
                f"≤ 2 ms: {verdict(added_fresh <= 2)}",
            ),
            (
                "small GET: published adds, p50 (kept-alive)",
                f"{added_published:+.3f} ms",
                f"≤ 2 ms: {verdict(added_published <= 2)}",
            ),
            (
                f"{BIG_MB} MB: proxy / forward throughput",
                f"{ratio * 100:.0f} %",
                f"≥ 50 %: {verdict(ratio >= 0.5)}",
            ),
            (
                f"{CONCURRENT} concurrent GETs via proxy: errors",
                str(len(kiln_b.errors)),
                f"= 0: {verdict(not kiln_b.errors)}",
            ),
        ],
    )


# ------------------------------------------------------------------------------ parts


def measure(server: Any, s: Settings) -> None:
    _, key = server.store.create_user("bench")
    http = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=600
    )
    try:
        r = http.post("/sandboxes", json={"name": "proxy-bench"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        pids: list[int] = []
        try:
            sb = start_service(server, http, sid, s, pids)
            host = f"{ALIAS}.localhost:{server.url.rpartition(':')[2]}"
            load = LoadClient(server.url, key, host)
            try:
                small = small_get_rows(sb, load, s)
                downloads = download_rows(sb, load, s)
                bursts = burst_rows(sb, load, s)
                if PROFILE:
                    profile_proxy(server, sb, load)
            finally:
                load.close()
        finally:
            # A test-mode agent's background processes outlive it (their own process
            # groups), so the service is killed before its sandbox goes.
            for pid in pids:
                http.post(f"/sandboxes/{sid}/processes/{pid}/signal", json={"signal": "KILL"})
            http.delete(f"/sandboxes/{sid}")
    finally:
        http.close()
    report(s, small, downloads, bursts)


def part1() -> None:
    from server.harness import LiveServer  # noqa: PLC0415 -- the test harness, on sys.path

    settings = Settings(
        title="test-mode agent (no VM)",
        n=300,
        warmup=30,
        downloads=5,
        rounds=10,
        python=sys.executable,
        service_dir=lambda server, sid: str(server.engine.workdir(sid)),
        port=free_port,
    )
    root = Path(tempfile.mkdtemp(prefix="kbproxy-"))
    server = LiveServer(root).start()
    try:
        measure(server, settings)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def part2() -> None:
    from kiln.engine.qemu import QemuConfig, QemuEngine  # noqa: PLC0415
    from kiln.images import ensure_image  # noqa: PLC0415
    from kiln.network import NetworkConfig  # noqa: PLC0415
    from server.harness import LiveServer  # noqa: PLC0415

    ensure_image("minimal", progress=lambda m: print(f"  image: {m}", flush=True))
    netns = f"kiln-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    root = Path(tempfile.mkdtemp(prefix="kbproxyvm-"))
    net = NetworkConfig(netns=netns, bridge="kbproxy0", subnet="10.213.78.0/24", nat=False)

    def factory(data: Path) -> QemuEngine:
        return QemuEngine(
            QemuConfig(data_dir=data / "qemu", volumes_dir=data / "volumes", network=net)
        )

    settings = Settings(
        title="microVM (QEMU)",
        n=200,
        warmup=20,
        downloads=4,
        rounds=5,
        python="python3",
        service_dir=lambda server, sid: "/tmp/kbench",
        port=lambda: 8000,
    )
    server = LiveServer(root, engine_factory=factory, config_overrides={"network": net})
    try:
        server.start()
        measure(server, settings)
    finally:
        if server.url:
            server.stop()
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    part1()
    reason = vm_skip_reason()
    if reason is not None:
        print(f"\n(part 2, a real microVM, skipped: {reason})")
        return
    part2()


if __name__ == "__main__":
    main()
