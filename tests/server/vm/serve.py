"""``kiln serve`` as a subprocess: the real CLI daemon, its URL read from its log; an API
client of it, and exec through that client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

SRC = Path(__file__).resolve().parents[3] / "src"


class Serve:
    """``kiln serve --config CONFIG`` with ``HOME=home``, output appended to ``log``;
    ``env`` adds to (or, with None values, removes from) the daemon's environment."""

    def __init__(
        self,
        config: Path,
        home: Path,
        log: Path,
        env: Mapping[str, str | None] | None = None,
    ) -> None:
        full = dict(os.environ, HOME=str(home), PYTHONPATH=str(SRC))
        full.pop("KILN_URL", None)
        for key, value in (env or {}).items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        self.log_path = log
        self._start = log.stat().st_size if log.exists() else 0
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full,
        )
        try:
            self.url = self._wait_url()
        except BaseException:
            self.stop(signal.SIGKILL)  # a daemon that never listened leaves nothing open
            raise

    def output(self) -> str:
        """What this daemon wrote to the log so far."""
        return self.log_path.read_bytes()[self._start :].decode(errors="replace")

    def _wait_url(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = self.output()
            urls = re.findall(r"kiln daemon listening on (http://\S+)", text)
            if urls:
                return str(urls[0])
            if self.proc.poll() is not None:
                raise AssertionError(f"kiln serve exited: {text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"kiln serve did not listen: {self.log_path.read_text()[-3000:]}")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()


def client(serve: Serve, data: Path, key: str | None = None) -> httpx.Client:
    """An API client of ``serve`` with ``key`` (default: the admin's, from the data dir)."""
    key = key or (data / "admin-api-key").read_text().strip()
    return httpx.Client(base_url=serve.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def exec_ok(c: httpx.Client, name: str, *cmd: str, timeout_s: float | None = None) -> str:
    """The stdout of ``cmd`` run in sandbox ``name``, which must exit 0; ``timeout_s``
    bounds it in the daemon (None: no bound, as the API's default)."""
    body: dict[str, Any] = {"cmd": list(cmd)}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    r = c.post(f"/sandboxes/{name}/exec", json=body)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["exit_code"] == 0, result
    return str(result["stdout"])
