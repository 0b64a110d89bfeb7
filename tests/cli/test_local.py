"""Commands on this machine: ``user`` (the daemon's store), ``serve``, ``image``."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from kiln.store import Store
from sdk.conftest import Daemon

from .conftest import Cli, kiln_argv, unique
from .test_commands import assert_one_line_error


def key_from(output: str) -> str:
    match = re.search(r"^(kiln_\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def test_user_lifecycle_keys_work_against_the_daemon(cli: Cli, daemon: Daemon) -> None:
    data = ("--data-dir", str(daemon.data_dir))
    name = unique("user")
    key = key_from(cli.ok("user", "create", name, "--max-sandboxes", "3", *data))
    assert cli("--token", key, "list").returncode == 0

    users = json.loads(cli.ok("user", "list", "--json", *data))
    mine = next(u for u in users if u["name"] == name)
    assert (mine["admin"], mine["max_sandboxes"]) == (False, 3)
    assert name in cli.ok("user", "list", *data)

    new_key = key_from(cli.ok("user", "rotate-key", name, *data))
    assert new_key != key
    assert_one_line_error(cli("--token", key, "list"), "invalid API key")
    assert cli("--token", new_key, "list").returncode == 0

    assert_one_line_error(cli("user", "create", name, *data), name)
    cli.ok("user", "delete", name, *data)
    assert_one_line_error(cli("--token", new_key, "list"), "invalid API key")
    assert_one_line_error(cli("user", "delete", name, *data), name)


def test_user_commands_print_json_for_scripts(cli: Cli, daemon: Daemon) -> None:
    data = ("--data-dir", str(daemon.data_dir))
    name = unique("user")
    created = json.loads(
        cli.ok("user", "create", name, "--max-image-disk", "2048", "--json", *data)
    )
    assert (created["name"], created["admin"]) == (name, False)
    assert created["max_image_disk_mb"] == 2048
    assert "image disk 2G" in cli.ok("user", "list", *data)
    assert cli("--token", created["api_key"], "list").returncode == 0
    rotated = json.loads(cli.ok("user", "rotate-key", name, "--json", *data))
    assert rotated["name"] == name and rotated["api_key"] != created["api_key"]
    assert cli("--token", rotated["api_key"], "list").returncode == 0
    assert json.loads(cli.ok("user", "rm", name, "--json", *data)) == {"deleted": name}


def test_user_create_in_a_fresh_data_dir(cli: Cli, tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    assert key_from(cli.ok("user", "create", "first", "--admin", "--data-dir", str(data_dir)))
    assert (data_dir / "kiln.db").exists()


def test_user_commands_on_the_postgres_store_the_config_names(
    cli: Cli, tmp_path: Path, pg_url: str
) -> None:
    config = tmp_path / "kiln.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nstore: {pg_url}\n")
    key = key_from(cli.ok("user", "create", "pat", "--admin", "--config", str(config)))
    listed = json.loads(cli.ok("user", "list", "--json", "--config", str(config)))
    assert [(u["name"], u["admin"]) for u in listed] == [("pat", True)]
    assert not (tmp_path / "data" / "kiln.db").exists()
    with Store.open(pg_url) as store:
        assert store.user_by_key(key) == store.user_by_name("pat")


def test_image_list_and_unknown_tier(cli: Cli, tmp_path: Path) -> None:
    images = tmp_path / "images"
    assert json.loads(cli.ok("image", "cached", "--json", "--image-dir", str(images))) == []
    proc = cli("image", "build", "no-such-tier", "--image-dir", str(images))
    assert_one_line_error(proc, "no-such-tier")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_runs_the_daemon_and_stops_on_sigterm(cli: Cli, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        *kiln_argv(),
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    env = {"HOME": str(cli.home), "PATH": "/usr/bin:/bin"}
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the daemon did not answer /health"
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            # The first start wrote the admin key to the client config: the CLI just works.
            config = yaml.safe_load((cli.home / ".kiln" / "config.yaml").read_text())
            assert config["url"] == url
            assert cli("list", env={"KILN_URL": "", "KILN_TOKEN": ""}).returncode == 0
            # A second daemon on the same address fails with one error line (after its log).
            second = cli(
                "serve", "--data-dir", str(tmp_path / "d2"), "--listen", f"127.0.0.1:{port}"
            )
            stderr = second.stderr.decode()
            assert second.returncode == 1 and "Traceback" not in stderr
            assert stderr.splitlines()[-1].startswith("kiln: error: cannot listen on"), stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
