"""envd's filesystem service and ``/files`` on a live daemon (fake engine, real
test-mode agents), at the HTTP level: the shapes and codes the SDK parses, the
upload encodings (octet-stream with and without a length, gzip, multipart with
several files), the upload limit, and the watcher calls.

The test-mode agent shares this host's filesystem and has no ``sandbox`` account,
so these calls act as root (``Authorization: Basic root:``) on absolute paths;
the default user is exercised on real VMs (test_files.py).
"""

from __future__ import annotations

import base64
import gzip
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import ApiUser
from ..harness import LiveServer

ENVD = "/e2b/envd"
FS = f"{ENVD}/filesystem.Filesystem"
LIMIT = 4 << 20
ROOT = "Basic " + base64.b64encode(b"root:").decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("envd-files"), max_upload_bytes=LIMIT).start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def box(api: ApiUser, server: LiveServer) -> tuple[dict[str, str], Path]:
    """The headers of envd calls for a new sandbox, and its directory."""
    sb = api.sandbox()
    sandbox_id = str(sb["id"])
    token = server.services.envd_tokens.issue(sandbox_id)
    headers = {"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": token, "Authorization": ROOT}
    return headers, server.engine.workdir(sandbox_id)


def rpc(anon: httpx.Client, headers: dict[str, str], method: str, body: Any) -> httpx.Response:
    return anon.post(f"{FS}/{method}", json=body, headers=headers)


def upload(
    anon: httpx.Client, headers: dict[str, str], params: dict[str, str], **kw: Any
) -> httpx.Response:
    return anon.post(f"{ENVD}/files", params={"username": "root", **params}, headers=headers, **kw)


def test_octet_stream_uploads(anon: httpx.Client, box: tuple[dict[str, str], Path]) -> None:
    headers, work = box
    octet = {**headers, "Content-Type": "application/octet-stream"}
    r = upload(anon, octet, {"path": f"{work}/sized.bin"}, content=b"abc")
    assert r.status_code == 200, r.text
    assert r.json() == [{"name": "sized.bin", "type": "file", "path": f"{work}/sized.bin"}]
    assert (work / "sized.bin").read_bytes() == b"abc"

    big = bytes(range(256)) * 8192  # over the spool's memory part: goes through a file

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, spooled
        for i in range(0, len(big), 100_000):
            yield big[i : i + 100_000]

    r = upload(anon, octet, {"path": f"{work}/chunked.bin"}, content=chunks())
    assert r.status_code == 200, r.text
    assert (work / "chunked.bin").read_bytes() == big

    zipped = {**octet, "Content-Encoding": "gzip"}
    r = upload(anon, zipped, {"path": f"{work}/gz.txt"}, content=gzip.compress(b"x" * 500_000))
    assert r.status_code == 200, r.text
    assert (work / "gz.txt").read_bytes() == b"x" * 500_000
    r = upload(anon, zipped, {"path": f"{work}/bad.txt"}, content=b"not gzip at all")
    assert r.status_code == 400
    assert r.json()["code"] == 400 and "gzip" in r.json()["message"]
    assert not (work / "bad.txt").exists()


def test_multipart_uploads(anon: httpx.Client, box: tuple[dict[str, str], Path]) -> None:
    headers, work = box
    files = [("file", (f"{work}/m/one.txt", b"1")), ("file", (f"{work}/m/two.txt", b"22"))]
    r = upload(anon, headers, {}, files=files)
    assert r.status_code == 200, r.text
    assert [e["path"] for e in r.json()] == [f"{work}/m/one.txt", f"{work}/m/two.txt"]
    assert (work / "m/two.txt").read_bytes() == b"22"
    # One part and a path: the path wins over the part's file name.
    r = upload(anon, headers, {"path": f"{work}/chosen"}, files=[("file", ("ignored", b"c"))])
    assert r.status_code == 200, r.text
    assert (work / "chosen").read_bytes() == b"c"
    assert not (work / "ignored").exists()
    r = upload(anon, headers, {}, data={"not": "a file"}, files=[])
    assert r.status_code == 400


def test_upload_errors(anon: httpx.Client, box: tuple[dict[str, str], Path]) -> None:
    headers, work = box
    octet = {**headers, "Content-Type": "application/octet-stream"}
    too_big = upload(anon, octet, {"path": f"{work}/big"}, content=b"x" * (LIMIT + 1))
    assert too_big.status_code == 413
    assert too_big.json()["code"] == 413

    def endless() -> Iterator[bytes]:
        for _ in range(LIMIT // 65536 + 2):
            yield b"y" * 65536

    assert upload(anon, octet, {"path": f"{work}/big"}, content=endless()).status_code == 413
    assert not (work / "big").exists()
    assert upload(anon, octet, {}, content=b"x").status_code == 400  # no path
    r = upload(anon, octet, {"path": f"{work}/x", "username": "mallory"}, content=b"x")
    assert r.status_code == 400 and "mallory" in r.json()["message"]
    (work / "dir").mkdir()
    assert upload(anon, octet, {"path": f"{work}/dir"}, content=b"x").status_code == 400


def test_download(anon: httpx.Client, box: tuple[dict[str, str], Path]) -> None:
    headers, work = box
    (work / "f.bin").write_bytes(b"\x00\x01" * 100_000)
    params = {"path": f"{work}/f.bin", "username": "root"}
    r = anon.get(f"{ENVD}/files", params=params, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-length"] == "200000"
    assert r.content == b"\x00\x01" * 100_000
    missing = anon.get(f"{ENVD}/files", params={**params, "path": f"{work}/no"}, headers=headers)
    assert missing.status_code == 404
    assert missing.json()["code"] == 404
    folder = anon.get(f"{ENVD}/files", params={**params, "path": str(work)}, headers=headers)
    assert folder.status_code == 400


def test_rpc_codes(anon: httpx.Client, box: tuple[dict[str, str], Path]) -> None:
    headers, work = box
    r = rpc(anon, headers, "Stat", {"path": f"{work}/none"})
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = rpc(anon, headers, "MakeDir", {"path": f"{work}/d"})
    assert r.status_code == 200, r.text
    entry = r.json()["entry"]
    assert entry["type"] == "FILE_TYPE_DIRECTORY"
    assert entry["path"] == f"{work}/d"
    assert entry["owner"] == "root" and entry["permissions"] == "drwxr-xr-x"
    assert entry["mode"] == 0o755
    r = rpc(anon, headers, "MakeDir", {"path": f"{work}/d"})
    assert r.json()["code"] == "already_exists"
    (work / "f").write_text("12")
    r = rpc(anon, headers, "MakeDir", {"path": f"{work}/f"})
    assert r.json()["code"] == "invalid_argument"
    r = rpc(anon, headers, "ListDir", {"path": f"{work}/f"})
    assert r.json()["code"] == "invalid_argument"
    r = rpc(anon, headers, "ListDir", {"path": str(work), "depth": 2})
    assert r.status_code == 200, r.text
    listed = {e["name"]: e for e in r.json()["entries"]}
    assert set(listed) == {"d", "f"}
    assert (listed["f"]["size"], listed["f"]["type"]) == ("2", "FILE_TYPE_FILE")
    r = rpc(anon, headers, "Move", {"source": f"{work}/f", "destination": f"{work}/d/g"})
    assert r.status_code == 200, r.text
    assert (r.json()["entry"]["name"], r.json()["entry"]["size"]) == ("g", "2")
    r = rpc(anon, headers, "Move", {"source": f"{work}/f", "destination": f"{work}/h"})
    assert r.json()["code"] == "not_found"
    assert rpc(anon, headers, "Remove", {"path": f"{work}/d"}).json() == {}
    assert rpc(anon, headers, "Remove", {"path": f"{work}/d"}).json() == {}  # already gone
    assert not (work / "d").exists()
    r = rpc(anon, headers, "Stat", {})
    assert r.json()["code"] == "invalid_argument"


def test_watcher_calls(anon: httpx.Client, box: tuple[dict[str, str], Path]) -> None:
    headers, work = box
    r = rpc(anon, headers, "CreateWatcher", {"path": str(work), "recursive": False})
    assert r.status_code == 200, r.text
    watcher = r.json()["watcherId"]
    (work / "new.txt").write_text("x")
    events: list[dict[str, str]] = []
    deadline = time.monotonic() + 10
    wanted = {"name": "new.txt", "type": "EVENT_TYPE_WRITE"}
    while time.monotonic() < deadline and wanted not in events:
        r = rpc(anon, headers, "GetWatcherEvents", {"watcherId": watcher})
        assert r.status_code == 200, r.text
        events += r.json()["events"]
        time.sleep(0.05)
    assert events[:2] == [
        {"name": "new.txt", "type": "EVENT_TYPE_CREATE"},
        {"name": "new.txt", "type": "EVENT_TYPE_WRITE"},
    ]
    assert rpc(anon, headers, "RemoveWatcher", {"watcherId": watcher}).json() == {}
    r = rpc(anon, headers, "GetWatcherEvents", {"watcherId": watcher})
    assert r.json()["code"] == "not_found"
    r = rpc(anon, headers, "CreateWatcher", {"path": f"{work}/missing"})
    assert r.json()["code"] == "not_found"
