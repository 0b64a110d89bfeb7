"""``kiln cp``'s archive routes against the plain file routes, over the real API.

    .venv/bin/python -m bench.bench_cp

The real API (uvicorn + FastAPI + services + SQLite, the server in a thread)
over the fake engine with a real test-mode agent, so ``tar`` runs on this
machine: the numbers are the HTTP layer, the streaming exec and the tar
scanner. The reference rows move the same bytes through ``PUT``/``GET
/files`` in the same run, alternating with the archive rows.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from ._harness import agent_skip_reason, ms_since
from ._stats import Row, print_table

REQUIRES: str | None = "the guest agent in --test-mode, GNU tar"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

N = 30
WARMUP = 3
BIG = 5 << 20
SMALL_FILES = 200


def skip_reason() -> str | None:
    if shutil.which("tar") is None:
        return "tar is not installed"
    return agent_skip_reason()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def main() -> None:
    from server.harness import LiveServer  # noqa: PLC0415 -- the test harness, on sys.path

    root = Path(tempfile.mkdtemp(prefix="kbcp-"))
    server = LiveServer(root).start()
    try:
        _, key = server.store.create_user("bench")
        http = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        sid = http.post("/sandboxes", json={"name": "cp"}).json()["id"]
        work = server.engine.workdir(sid)
        big = os.urandom(BIG)
        big_tar = _tar([("big.bin", big)])
        small = [(f"tree/f{i:03d}.txt", os.urandom(1024)) for i in range(SMALL_FILES)]
        small_tar = _tar(small)
        (work / "tree").mkdir()
        rows: dict[str, list[float]] = {}

        def sample(name: str, fn: object) -> None:
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            rows.setdefault(name, []).append(ms_since(start))

        def put_file() -> None:
            r = http.put("/sandboxes/cp/files", params={"path": "big.bin"}, content=big)
            assert r.status_code == 200, r.text

        def put_archive(body: bytes) -> None:
            r = http.put("/sandboxes/cp/archive", params={"path": "."}, content=body)
            assert r.status_code == 200, r.text

        def get_file() -> None:
            r = http.get("/sandboxes/cp/files", params={"path": "big.bin"})
            assert len(r.content) == BIG

        def get_archive(path: str) -> None:
            r = http.get("/sandboxes/cp/archive", params={"path": path})
            assert r.status_code == 200 and len(r.content) > 0

        def put_small_files() -> None:
            for name, data in small:
                r = http.put("/sandboxes/cp/files", params={"path": name}, content=data)
                assert r.status_code == 200, r.text

        for i in range(WARMUP + N):
            timed = [
                ("5 MiB file: PUT /files (reference)", put_file),
                ("5 MiB file: PUT /archive", lambda: put_archive(big_tar)),
                ("5 MiB file: GET /files (reference)", get_file),
                ("5 MiB file: GET /archive", lambda: get_archive("big.bin")),
                (f"{SMALL_FILES} x 1 KiB: PUT /files each (reference)", put_small_files),
                (f"{SMALL_FILES} x 1 KiB: PUT /archive", lambda: put_archive(small_tar)),
                (f"{SMALL_FILES} x 1 KiB: GET /archive", lambda: get_archive("tree")),
            ]
            for name, fn in timed:
                if i < WARMUP:
                    fn()
                else:
                    sample(name, fn)
        http.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        "kiln cp's archive routes vs the file routes (real API, test-mode agent, no VM)",
        [Row(name, samples) for name, samples in rows.items()],
    )


if __name__ == "__main__":
    main()
