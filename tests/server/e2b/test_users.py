"""E2B's default account (``user``, home ``/home/user``) on the Docker engine: a daemon
whose default engine is Docker, a sandbox created through the SDK, checked through
kiln's API (the QEMU engine's is checked in ``test_control.py``)."""

from __future__ import annotations

import pytest
from e2b import Sandbox, SandboxState

from .conftest import E2B_MARKS, E2bDaemon, kiln_exec

pytestmark = E2B_MARKS


def test_the_e2b_user_on_docker(
    e2b_docker_daemon: E2bDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in e2b_docker_daemon.env().items():
        monkeypatch.setenv(name, value)
    sb = Sandbox.create(envs={"WHO": "ct"})
    try:
        with e2b_docker_daemon.api() as api:
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
