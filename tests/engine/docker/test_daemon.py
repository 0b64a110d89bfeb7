"""A real private dockerd: start, containers on runc and runsc, pause, checkpoint, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from kiln.engine.docker import (
    Dockerd,
    DockerdConfig,
    DockerdNotInstalled,
    DockerdStartFailed,
    DockerdUnavailable,
    cleanup_leftovers,
    probe,
)
from kiln.engine.docker.daemon import running_processes
from kiln.engine.docker.host import cgroup_dirs, mounts_below
from kiln.engine.docker.runsc import kernel_shows_rmem_default_everywhere
from kiln.engine.docker.testing import (
    GATEWAY,
    busybox_rootfs_tar,
    checkpoint,
    import_rootfs,
    private_dockerd,
    start_from_checkpoint,
)
from kiln.network import NamespaceWorker

from .conftest import IMAGE, RUNTIMES, skip_unless_available

pytestmark = pytest.mark.netns

RunContainer = Callable[..., Any]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def exited(pid: int) -> bool:
    """Gone, or a zombie (here PID 1 does not reap the orphans it inherits)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True


def assert_nothing_left(config: DockerdConfig) -> None:
    assert list(running_processes(config)) == []
    assert mounts_below([config.root]) == []
    assert cgroup_dirs(config.cgroup_parent or "") == []
    assert not config.exec_root.exists()


# -- the session daemon ---------------------------------------------------------------------


def test_started_with_kilns_choices(dockerd: Dockerd) -> None:
    info = dockerd.info
    assert {"runc", "runsc"} <= set(info.runtimes)
    assert info.default_runtime == "runc"
    assert info.storage_driver == "overlay2"
    assert info.cgroup_driver == "cgroupfs"
    assert info.experimental
    assert info.root_dir == str(dockerd.config.data_root)
    assert not dockerd.adopted
    # Debian's runsc (2022) needs the wrapper exactly where the kernel shows the sysctl.
    assert dockerd.runsc_wrapped == kernel_shows_rmem_default_everywhere()


def test_probe_a_running_daemon(dockerd: Dockerd) -> None:
    info = probe(dockerd.url, runtimes=("runc", "runsc"))
    assert info.version == dockerd.info.version
    with pytest.raises(DockerdUnavailable, match="no runtime 'kata'"):
        probe(dockerd.url, runtimes=("runsc", "kata"))


def test_start_adopts_the_running_daemon(dockerd: Dockerd) -> None:
    twin = Dockerd(dockerd.config)
    info = twin.start()  # never stopped: it is the session's daemon
    assert twin.adopted
    assert twin.pid == dockerd.pid
    assert info.root_dir == dockerd.info.root_dir


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_rm_reports_the_exit_code(docker_client: Any, busybox: str, runtime: str) -> None:
    out = docker_client.containers.run(busybox, ["echo", "hello"], runtime=runtime, remove=True)
    assert out == b"hello\n"
    with pytest.raises(docker.errors.ContainerError) as failed:
        docker_client.containers.run(busybox, ["sh", "-c", "exit 7"], runtime=runtime, remove=True)
    assert failed.value.exit_status == 7
    assert docker_client.containers.list(all=True, filters={"ancestor": busybox}) == []


def _read_line(server: socket.socket) -> bytes:
    """Accept one connection, read one line, close (busybox nc waits for our close)."""
    conn, _ = server.accept()
    with conn:
        conn.settimeout(10)
        data = b""
        while b"\n" not in data and (chunk := conn.recv(4096)):
            data += chunk
    return data


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_container_on_kilns_bridge(
    dockerd: Dockerd, run_container: RunContainer, runtime: str
) -> None:
    container = run_container(["sleep", "1000"], runtime=runtime)
    container.reload()
    address = container.attrs["NetworkSettings"]["IPAddress"]
    assert address.startswith("10.213.60.")
    enter = ["nsenter", f"--net=/run/netns/{dockerd.config.netns}", "busybox"]
    # Inbound: the bridge's namespace reaches the container (for runsc: gVisor's
    # own network stack answers, which is the netns workaround at work).
    pinged = subprocess.run(
        [*enter, "ping", "-c", "1", "-W", "5", address],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    # Outbound: a TCP connection from the container to a listener on the gateway
    # address (a socket made inside the namespace). Not ping: runsc refuses raw
    # sockets unless it runs with --net-raw.
    worker = NamespaceWorker(dockerd.config.netns)
    try:
        server = worker.run(lambda: socket.create_server((GATEWAY, 0)))
    finally:
        worker.close()
    with server, ThreadPoolExecutor(1) as pool:
        server.settimeout(10)
        received = pool.submit(_read_line, server)
        port = server.getsockname()[1]
        sent = container.exec_run(["sh", "-c", f"echo {runtime} | nc -w 5 {GATEWAY} {port}"])
        assert sent.exit_code == 0, sent.output
        assert received.result(timeout=10).strip() == runtime.encode()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_pause_and_unpause(run_container: RunContainer, runtime: str) -> None:
    container = run_container(["sleep", "1000"], runtime=runtime)
    container.pause()
    container.reload()
    assert container.status == "paused"
    with pytest.raises(docker.errors.APIError, match="paused"):
        container.exec_run(["true"])
    container.unpause()

    def running() -> bool:
        container.reload()
        return bool(container.status == "running")

    wait_for(running)  # dockerd 20.10 clears "paused" when containerd's event arrives
    assert container.exec_run(["true"]).exit_code == 0


def test_runsc_checkpoint_keeps_process_memory(
    dockerd: Dockerd, run_container: RunContainer
) -> None:
    # The loop reads a token once, deletes the file, and from then on holds the
    # token only in memory: after a restore it can only come from the checkpoint.
    script = (
        "while [ ! -f /tmp/token ]; do sleep 0.05; done; t=$(cat /tmp/token); rm /tmp/token; "
        "while true; do echo $t > /tmp/out; sleep 0.05; done"
    )
    container = run_container(["sh", "-c", script], runtime="runsc")
    token = os.urandom(6).hex()
    container.exec_run(["sh", "-c", f"echo {token} > /tmp/token"])
    wait_for(lambda: container.exec_run(["cat", "/tmp/out"]).output.strip() == token.encode())

    # Twice: the second cycle checkpoints a container that was itself restored,
    # which needs both of kiln's fixes (containerd's GC setting, runsc's state).
    client = container.client
    for cycle in range(2):
        name = f"cp{cycle}-{token}"
        checkpoint(client, dockerd, container.id, name)
        container.reload()
        assert container.status == "exited"
        start_from_checkpoint(client, container.id, name)
        container.exec_run(["rm", "-f", "/tmp/out"])
        wait_for(lambda: container.exec_run(["cat", "/tmp/out"]).output.strip() == token.encode())


def test_probe_names_the_reason(tmp_path: Path) -> None:
    with pytest.raises(DockerdUnavailable, match="no socket there"):
        probe(f"unix://{tmp_path}/absent.sock", timeout=2)
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a crashed daemon leaves
    with pytest.raises(DockerdUnavailable, match="nothing accepts connections"):
        probe(f"unix://{stale}", timeout=2)


# -- daemons of their own -------------------------------------------------------------------


def test_stop_leaves_nothing_behind(dockerd_root: Path) -> None:
    skip_unless_available()
    with private_dockerd(dockerd_root, subnet=None) as daemon:
        config = daemon.config
        with contextlib.closing(daemon.client()) as client:
            image = import_rootfs(client, busybox_rootfs_tar(), IMAGE)
            for runtime in RUNTIMES:
                for paused in (False, True):
                    c = client.containers.run(
                        image, ["sleep", "1000"], runtime=runtime, detach=True
                    )
                    if paused:
                        c.pause()
            assert len(client.containers.list()) == 4
        started = time.monotonic()
        leftovers = daemon.stop()
        assert time.monotonic() - started < 8  # paused containers do not cost docker's 10 s
    assert not leftovers.processes_or_mounts, leftovers
    assert_nothing_left(config)


def test_a_crashed_daemon_is_cleaned_up_and_restarted(dockerd_root: Path) -> None:
    skip_unless_available()
    with private_dockerd(dockerd_root) as daemon:
        config = daemon.config
        with contextlib.closing(daemon.client()) as client:
            image = import_rootfs(client, busybox_rootfs_tar(), IMAGE)
            for runtime in RUNTIMES:
                c = client.containers.run(image, ["sleep", "1000"], runtime=runtime, detach=True)
                c.pause()
        pid = daemon.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: exited(pid))
        assert list(running_processes(config)), "the containers outlive dockerd"

        leftovers = cleanup_leftovers(config)
        assert leftovers.killed and leftovers.unmounted
        assert_nothing_left(config)

        restarted = Dockerd(config)
        restarted.start()
        try:
            assert not restarted.adopted
            with contextlib.closing(restarted.client()) as client:
                states = {c.attrs["State"]["Status"] for c in client.containers.list(all=True)}
                assert states == {"exited"}
        finally:
            restarted.stop()
    assert_nothing_left(config)


def test_start_without_dockerd_says_how_to_install(dockerd_root: Path, netns: str) -> None:
    config = DockerdConfig(root=dockerd_root, netns=netns, dockerd="kiln-no-such-dockerd")
    with pytest.raises(DockerdNotInstalled, match=r"apt-get install docker\.io"):
        Dockerd(config).start()


def test_start_failure_carries_the_log_tail(dockerd_root: Path, netns: str) -> None:
    config = DockerdConfig(root=dockerd_root, netns=netns, bridge="kd-nosuchbr")
    with pytest.raises(DockerdStartFailed, match="exited with status") as failed:
        Dockerd(config).start()
    assert "bridge device with non default name kd-nosuchbr" in str(failed.value)
    assert_nothing_left(config)
