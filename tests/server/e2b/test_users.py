"""E2B's default account (``user``, home ``/home/user``) on the Docker engine: a daemon
whose default engine is Docker, a sandbox created through the SDK, checked through
kiln's API (the QEMU engine's is checked in ``test_control.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2b import Sandbox, SandboxState

from ..vm.host import Bridge, daemon_host
from .conftest import E2B_MARKS, E2bDaemon, kiln_exec, new_user

pytestmark = E2B_MARKS


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2bDaemon]:
    with daemon_host(
        tmp_path_factory.mktemp("e2b-docker"),
        "kiln-e2bd",
        vm=Bridge("ke2bq0", "10.213.48.0/24"),
        docker=Bridge("ke2bd0", "10.213.49.0/24"),
        extra={"engine": "docker", "templates": False},
    ) as host:
        serve = host.serve()
        try:
            yield E2bDaemon(host, serve, new_user(host, "carol"), new_user(host, "dave"))
        finally:
            serve.stop()


def test_the_e2b_user_on_docker(docker_daemon: E2bDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in docker_daemon.env().items():
        monkeypatch.setenv(name, value)
    sb = Sandbox.create(envs={"WHO": "ct"})
    try:
        with docker_daemon.api() as api:
            kiln = api.get(f"/sandboxes/{sb.sandbox_id}").json()
            assert kiln["engine"] == "docker"
            script = 'echo "$WHO $(id -un) $HOME $(stat -c %U /home/user) $(pwd)"'
            assert kiln_exec(api, sb.sandbox_id, script) == "ct user /home/user user /workspace\n"
            assert kiln_exec(api, sb.sandbox_id, "sudo -n id -un") == "root\n"
            # kiln's own sandboxes on this daemon keep kiln's user.
            r = api.post("/sandboxes", json={})
            assert r.status_code == 201, r.text
            assert kiln_exec(api, r.json()["id"], "id -un") == "sandbox\n"
            assert api.delete(f"/sandboxes/{r.json()['id']}").status_code == 204

            # A Docker pause keeps the files (not the processes), and the account.
            kiln_exec(api, sb.sandbox_id, "echo kept > ~/note")
            assert sb.pause() is True
            assert sb.get_info().state == SandboxState.PAUSED
            Sandbox.connect(sb.sandbox_id)
            assert kiln_exec(api, sb.sandbox_id, "cat ~/note; id -un") == "kept\nuser\n"
    finally:
        assert sb.kill() is True
