"""Files over HTTP: GET (whole, truncated, ls), HEAD, PUT (411, 413, atomic, mode)."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .conftest import ApiUser
from .harness import LiveServer


def read_answer(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (it must: the
    announced body was never read)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.fixture
def box(api: ApiUser, server: LiveServer) -> tuple[str, Path]:
    sb = api.sandbox(name="files")
    return "files", server.engine.workdir(str(sb["id"]))


def test_put_then_get_whole_file(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    data = bytes(range(256)) * 4096  # 1 MiB of binary
    r = api.http.put(f"/sandboxes/{name}/files", params={"path": "dir/sub/blob"}, content=data)
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "dir/sub/blob", "size": len(data)}
    assert (work / "dir/sub/blob").read_bytes() == data  # parents were created

    r = api.http.get(f"/sandboxes/{name}/files", params={"path": "dir/sub/blob"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-file-size"] == str(len(data))
    assert r.headers["content-length"] == str(len(data))
    assert r.content == data


def test_empty_file(api: ApiUser, box: tuple[str, Path]) -> None:
    name, _ = box
    assert api.http.put(f"/sandboxes/{name}/files?path=empty", content=b"").status_code == 200
    r = api.http.get(f"/sandboxes/{name}/files?path=empty")
    assert (r.content, r.headers["content-length"], r.headers["x-file-size"]) == (b"", "0", "0")


def test_truncated_reads_have_no_content_length(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    (work / "lines.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    size = str((work / "lines.txt").stat().st_size)

    def get(**params: object) -> tuple[bytes, dict[str, str]]:
        r = api.http.get(f"/sandboxes/{name}/files", params={"path": "lines.txt", **params})
        assert r.status_code == 200, r.text
        return r.content, dict(r.headers)

    body, headers = get(max_bytes=5)
    assert body == b"line "
    assert headers["x-file-size"] == size and "content-length" not in headers
    body, headers = get(offset=3, limit=2)
    assert body == b"line 3\nline 4\n"
    assert headers["x-file-size"] == size and "content-length" not in headers
    # Options that do not cut anything: whole, so Content-Length is there.
    body, headers = get(max_bytes=10_000)
    assert headers["content-length"] == size and len(body) == int(size)
    body, headers = get(limit=100)
    assert headers["content-length"] == size


def test_head_reports_size_mode_and_kind(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    (work / "script.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(work / "script.sh", 0o750)
    r = api.http.head(f"/sandboxes/{name}/files", params={"path": "script.sh"})
    assert r.status_code == 200
    assert r.headers["x-file-size"] == "10"
    assert r.headers["x-file-mode"] == "0750"
    assert r.headers["x-file-isdir"] == "false"
    r = api.http.head(f"/sandboxes/{name}/files", params={"path": "."})
    assert r.headers["x-file-isdir"] == "true"
    assert api.http.head(f"/sandboxes/{name}/files?path=nope").status_code == 404


def test_ls(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    (work / "b.txt").write_text("bb")
    (work / "a").mkdir()
    r = api.http.get(f"/sandboxes/{name}/files", params={"path": ".", "ls": "true"})
    assert r.status_code == 200
    entries = r.json()
    assert [e["name"] for e in entries] == ["a", "b.txt"]
    assert entries[0]["is_dir"] is True and entries[1]["size"] == 2
    assert set(entries[1]) >= {"name", "size", "mode", "is_dir", "mtime"}
    r = api.http.get(f"/sandboxes/{name}/files", params={"path": "b.txt", "ls": "true"})
    assert r.status_code == 400


def test_ls_sentinel_when_capped(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    big = work / "big"
    big.mkdir()
    for i in range(10_050):
        (big / f"f{i:05d}").touch()
    entries = api.http.get(f"/sandboxes/{name}/files", params={"path": "big", "ls": "1"}).json()
    assert len(entries) == 10_001
    assert entries[-1] == {"name": "...", "truncated": True, "total": 10_050}


def test_missing_and_directory_reads(api: ApiUser, box: tuple[str, Path]) -> None:
    name, _ = box
    r = api.http.get(f"/sandboxes/{name}/files", params={"path": "no/such/file"})
    assert r.status_code == 404 and "error" in r.json()
    r = api.http.get(f"/sandboxes/{name}/files", params={"path": "."})
    assert r.status_code == 400 and "error" in r.json()
    assert api.http.get(f"/sandboxes/{name}/files").status_code in (400, 422)  # no path


def test_put_mode_and_bad_mode(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    r = api.http.put(f"/sandboxes/{name}/files", params={"path": "x", "mode": "0600"}, content=b"1")
    assert r.status_code == 200
    assert stat.S_IMODE((work / "x").stat().st_mode) == 0o600
    for bad in ("rwx", "99", "0o644", "-1"):
        r = api.http.put(f"/sandboxes/{name}/files", params={"path": "x", "mode": bad}, content=b"")
        assert r.status_code == 400, bad
    assert (work / "x").read_bytes() == b"1"


def test_put_without_content_length_is_411(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box

    def chunks() -> object:
        yield b"abc"

    r = api.http.put(f"/sandboxes/{name}/files?path=chunked", content=chunks())  # type: ignore[arg-type]
    assert r.status_code == 411
    assert "Content-Length" in r.json()["error"]
    assert not (work / "chunked").exists()


def test_put_over_the_cap_is_413_without_reading_it(
    api: ApiUser, box: tuple[str, Path], server: LiveServer
) -> None:
    name, work = box
    # Announce 200 MiB but send nothing: the answer must come before any body.
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"PUT /sandboxes/{name}/files?path=huge HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {api.key}\r\nContent-Length: {200 << 20}\r\n\r\n"
            ).encode()
        )
        answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"error"' in answer
    assert not (work / "huge").exists()


def test_put_cap_is_configurable(tmp_path: Path) -> None:
    small = LiveServer(tmp_path, max_upload_bytes=1000).start()
    try:
        _, key = small.store.create_user("capped")
        import httpx  # noqa: PLC0415

        with httpx.Client(base_url=small.url, headers={"Authorization": f"Bearer {key}"}) as c:
            sid = c.post("/sandboxes", json={}).json()["id"]
            assert c.put(f"/sandboxes/{sid}/files?path=a", content=b"x" * 1000).status_code == 200
            r = c.put(f"/sandboxes/{sid}/files?path=b", content=b"x" * 1001)
            assert r.status_code == 413
    finally:
        small.stop()


def test_interrupted_upload_leaves_the_target_untouched(
    api: ApiUser, box: tuple[str, Path], server: LiveServer
) -> None:
    name, work = box
    (work / "precious").write_bytes(b"old content")
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"PUT /sandboxes/{name}/files?path=precious HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {api.key}\r\nContent-Length: 100000\r\n\r\n"
            ).encode()
            + b"new" * 1000
        )
    # The connection closed after 3000 of 100000 bytes.
    r = api.http.get(f"/sandboxes/{name}/files?path=precious")
    assert r.content == b"old content"
    # The temporary file goes once the daemon and the agent have seen the drop, which
    # on a busy host can be after the read above.
    deadline = time.monotonic() + 10
    while (leftovers := [p.name for p in work.iterdir() if p.name != "precious"]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert leftovers == []
    assert (work / "precious").read_bytes() == b"old content"


def test_paths_are_inside_the_sandbox_not_the_api(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    # Traversal-looking paths are the sandbox's business (its own filesystem); they do
    # not change which API resource is addressed.
    r = api.http.put(f"/sandboxes/{name}/files", params={"path": "a/../b.txt"}, content=b"b")
    assert r.status_code == 200
    assert (work / "b.txt").read_bytes() == b"b"
    r = api.http.get(f"/sandboxes/{name}/files", params={"path": "x\x00y"})
    assert r.status_code == 400


def test_mkdir_move_remove(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    url = f"/sandboxes/{name}/files"
    r = api.http.post(f"{url}/mkdir", json={"path": "a/b", "mode": "0750"})
    assert r.status_code == 200, r.text
    assert r.json() == {"path": str(work / "a/b"), "created": True}
    assert stat.S_IMODE((work / "a/b").stat().st_mode) == 0o750
    assert api.http.post(f"{url}/mkdir", json={"path": "a/b"}).json()["created"] is False
    (work / "file").write_text("x")
    assert api.http.post(f"{url}/mkdir", json={"path": "file"}).status_code == 409
    missing_parent = api.http.post(f"{url}/mkdir", json={"path": "no/such", "parents": False})
    assert missing_parent.status_code == 404

    (work / "other").write_text("y")
    r = api.http.post(f"{url}/move", json={"source": "file", "destination": "other"})
    assert r.status_code == 409, r.text
    assert (work / "other").read_text() == "y"
    move = {"source": "file", "destination": "a/b/moved", "overwrite": False}
    r = api.http.post(f"{url}/move", json=move)
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["path"], r.json()["size"]) == (
        "moved",
        str(work / "a/b/moved"),
        1,
    )
    r = api.http.post(f"{url}/move", json={"source": "gone", "destination": "x"})
    assert r.status_code == 404

    assert api.http.delete(url, params={"path": "a"}).status_code == 400  # not empty
    assert api.http.delete(url, params={"path": "a", "recursive": "true"}).status_code == 204
    assert not (work / "a").exists()
    assert api.http.delete(url, params={"path": "a"}).status_code == 404
    bad = api.http.post(f"{url}/move", json={"source": "other", "destination": "z", "x": 1})
    assert bad.status_code == 422


def test_ls_depth(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    (work / "d/e").mkdir(parents=True)
    (work / "d/e/f").write_text("x")
    params = {"path": "d", "ls": "true", "depth": "2"}
    r = api.http.get(f"/sandboxes/{name}/files", params=params)
    assert r.status_code == 200, r.text
    assert [(e["name"], e["path"]) for e in r.json()] == [
        ("e", str(work / "d/e")),
        ("f", str(work / "d/e/f")),
    ]
    r = api.http.get(f"/sandboxes/{name}/files", params={"path": "d", "depth": "2"})
    assert r.status_code == 400


def test_watch_streams_ndjson(api: ApiUser, box: tuple[str, Path]) -> None:
    name, work = box
    (work / "w").mkdir()
    params = {"path": "w", "recursive": "true"}
    with api.http.stream("GET", f"/sandboxes/{name}/files/watch", params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        put = api.http.put(f"/sandboxes/{name}/files", params={"path": "w/new"}, content=b"1")
        assert put.status_code == 200
        lines = r.iter_lines()
        assert json.loads(next(lines)) == {"name": "new", "type": "create"}
        assert json.loads(next(lines)) == {"name": "new", "type": "write"}
        assert (
            api.http.delete(
                f"/sandboxes/{name}/files", params={"path": "w", "recursive": "true"}
            ).status_code
            == 204
        )
        rest = [json.loads(line) for line in lines]  # ends with the directory
    assert rest == [{"name": "new", "type": "remove"}]
    missing = api.http.get(f"/sandboxes/{name}/files/watch", params={"path": "none"})
    assert missing.status_code == 404
