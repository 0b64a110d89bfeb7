"""A daemon answering malformed JSON: the SDK raises InvalidResponse naming the field.

The daemon here is a real HTTP server on loopback that answers canned bodies
(what a broken or foreign server could send); the SDK talks to it over real HTTP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kiln.sdk import AsyncKiln, InvalidResponse, Kiln

GOOD_SANDBOX = {"id": "sb-1", "name": "x", "status": "running", "newer_field": {"a": 1}}

#: Path → the JSON body answered to GET (and POST) there.
ANSWERS: dict[str, Any] = {
    "/health": {"status": "ok", "sandboxes": "two"},
    "/sandboxes/good": GOOD_SANDBOX,
    "/sandboxes/no-id": {"name": "x", "status": "running"},
    "/sandboxes/bad-time": {**GOOD_SANDBOX, "created_at": "last tuesday"},
    "/sandboxes/bad-nested": {**GOOD_SANDBOX, "capabilities": {"pause": "yes"}},
    "/sandboxes": {"sandboxes": []},  # an object where a list belongs
    "/sandboxes/sb-1/exec": {"exit_code": "0", "stdout": ""},
    "/sandboxes/sb-1/processes": [{"pid": 1, "cmd": "sleep 1"}],
    "/volumes": [{"name": "v", "size_mb": 1}, {"size_mb": 2}],
}


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        if path not in ANSWERS:
            self.send_error(404)
            return
        body = json.dumps(ANSWERS[path]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def kiln(url: str) -> Iterator[Kiln]:
    with Kiln(url=url, token="t", retries=0) as client:
        yield client


def test_unknown_fields_are_ignored(kiln: Kiln) -> None:
    sb = kiln.sandboxes.get("good")
    assert (sb.id, sb.name, sb.status) == ("sb-1", "x", "running")
    assert "newer_field" not in sb.to_dict()


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no-id", r"sandbox: field 'id' is missing"),
        ("bad-time", r"sandbox: field 'created_at': not an RFC 3339 time"),
        ("bad-nested", r"sandbox: field 'capabilities\.pause'"),
    ],
)
def test_a_malformed_sandbox_names_the_field(kiln: Kiln, ref: str, message: str) -> None:
    with pytest.raises(InvalidResponse, match=message):
        kiln.sandboxes.get(ref)


def test_malformed_answers_of_other_routes(kiln: Kiln) -> None:
    with pytest.raises(InvalidResponse, match=r"health: field 'sandboxes'"):
        kiln.health()
    with pytest.raises(InvalidResponse, match=r"sandbox list: expected a JSON list, got dict"):
        kiln.sandboxes.list()
    sb = kiln.sandboxes.get("good")
    with pytest.raises(InvalidResponse, match=r"exec result: field 'exit_code'.*'0'"):
        sb.exec(["true"])
    with pytest.raises(InvalidResponse, match=r"process list: field '0\.cmd'"):
        sb.processes.list()
    with pytest.raises(InvalidResponse, match=r"volume list: field '1\.name' is missing"):
        kiln.volumes.list()


async def test_the_async_client_validates_alike(url: str) -> None:
    async with AsyncKiln(url=url, token="t", retries=0) as akiln:
        assert (await akiln.sandboxes.get("good")).id == "sb-1"
        with pytest.raises(InvalidResponse, match=r"sandbox: field 'id' is missing"):
            await akiln.sandboxes.get("no-id")
