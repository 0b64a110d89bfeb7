"""Choosing an engine through the SDK: ``engine``/``runtime`` reach the daemon, and
what it says back (engine, runtime, capabilities, each engine's availability) arrives.

The daemons here run the real engine router over two agent-backed fake engines
named ``qemu`` and ``docker`` (the latter without snapshots, as Docker's), or
with ``docker`` unavailable (see ``running_two_engine_daemon``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from kiln.sdk import AsyncKiln, Capabilities, Kiln, NotFound, Unavailable, ValidationError

from .conftest import NO_DOCKER, Daemon, unique


@pytest.fixture
def k(two_engine_daemon: Daemon) -> Iterator[Kiln]:
    with Kiln(two_engine_daemon.url, two_engine_daemon.token) as client:
        yield client


@pytest.fixture
async def ak(two_engine_daemon: Daemon) -> AsyncIterator[AsyncKiln]:
    async with AsyncKiln(two_engine_daemon.url, two_engine_daemon.token) as client:
        yield client


def test_create_passes_engine_and_runtime(k: Kiln) -> None:
    with k.sandboxes.create(name=unique("gv"), engine="docker", runtime="runsc") as sb:
        assert (sb.engine, sb.runtime) == ("docker", "runsc")
        assert sb.capabilities == Capabilities(pause=True, snapshots=False)
        again = k.sandboxes.get(sb.name)
        assert (again.engine, again.runtime, again.capabilities) == (
            "docker",
            "runsc",
            sb.capabilities,
        )
        assert sb.to_dict()["capabilities"] == {"pause": True, "snapshots": False, "fork": False}
        assert sb.exec(["echo", "in a container"]).stdout == "in a container\n"


def test_without_engine_the_daemon_decides(k: Kiln) -> None:
    with k.sandboxes.create() as sb:
        assert (sb.engine, sb.runtime) == ("qemu", None)  # the daemon's default
        assert sb.capabilities == Capabilities(pause=True, snapshots=True, fork=True)


@pytest.mark.parametrize(
    ("engine", "runtime", "message"),
    [
        ("qemu", "runc", "only the docker engine has runtimes"),
        ("xen", None, "engine"),
        ("docker", "kata", "runtime"),
    ],
)
def test_bad_engine_choices_are_validation_errors(
    k: Kiln, engine: str, runtime: str | None, message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        k.sandboxes.create(engine=engine, runtime=runtime)
    assert info.value.status_code == 422


async def test_async_create_passes_engine_and_runtime(ak: AsyncKiln) -> None:
    async with await ak.sandboxes.create(engine="docker", runtime="runc") as sb:
        assert (sb.engine, sb.runtime) == ("docker", "runc")
        assert (await sb.refresh()).capabilities == Capabilities(pause=True, snapshots=False)
    with pytest.raises(ValidationError, match="runtimes"):
        await ak.sandboxes.create(engine="qemu", runtime="runsc")


def test_stop_without_snapshots_keeps_files_ends_processes(
    k: Kiln, two_engine_daemon: Daemon
) -> None:
    with k.sandboxes.create(name=unique("nosnap"), engine="docker") as sb:
        kept = f"{two_engine_daemon.workdir(sb.id)}/kept.txt"
        sb.files.write(kept, "still here\n")
        server = sb.processes.start("sleep 600")

        stopped = sb.stop()
        assert (stopped.status, stopped.thermal) == ("stopped", "cold")
        assert stopped.capabilities == Capabilities(pause=True, snapshots=False)

        started = sb.start()
        assert (started.status, started.thermal) == ("running", "hot")
        assert sb.files.read(kept).text == "still here\n"
        with pytest.raises(NotFound):  # a new guest: the old process table is gone
            sb.processes.get(server.pid)


def test_health_reports_each_engine(two_engine_daemon: Daemon, no_docker_daemon: Daemon) -> None:
    with Kiln(two_engine_daemon.url, "") as anonymous:
        health = anonymous.health()
    assert (health.engine, health.engines) == ("qemu", {"qemu": "ok", "docker": "ok"})
    with Kiln(no_docker_daemon.url, "") as anonymous:
        health = anonymous.health()
    assert (health.engine, health.engines) == ("qemu", {"qemu": "ok", "docker": NO_DOCKER})


def test_an_unavailable_engine_says_why(no_docker_daemon: Daemon) -> None:
    with Kiln(no_docker_daemon.url, no_docker_daemon.token) as k:
        with pytest.raises(Unavailable, match="dockerd is not installed") as info:
            k.sandboxes.create(engine="docker")
        assert info.value.status_code == 503
        assert [s for s in k.sandboxes.list() if s.engine == "docker"] == []  # none half-made
        with k.sandboxes.create(name=unique("vm")) as sb:  # the default engine works
            assert (sb.engine, sb.runtime) == ("qemu", None)
            assert sb.exec(["echo", "hi"]).stdout == "hi\n"


def test_a_saved_image_keeps_its_engine_and_runtime(k: Kiln, two_engine_daemon: Daemon) -> None:
    name = unique("dimg")
    engines = two_engine_daemon.server.engine
    with k.sandboxes.create(name=unique("dsrc"), engine="docker", runtime="runsc") as sb:
        sb.files.write("kept.txt", b"in the container's files\n")
        saved = sb.save_image(name)
    assert (saved.engine, saved.memory) == ("docker", False)  # files only, no memory
    try:
        with k.sandboxes.create(saved_image=name) as copy:
            assert (copy.engine, copy.runtime) == ("docker", "runsc")
            assert copy.files.read("kept.txt").data == b"in the container's files\n"
        with pytest.raises(ValidationError, match="engine"):
            k.sandboxes.create(saved_image=name, engine="qemu")
    finally:
        k.saved_images.delete(name)
    # Only the engine that made it was asked to delete its files.
    assert engines.get("docker").called("delete_saved_image") == [saved.id]
    assert saved.id not in engines.get("qemu").called("delete_saved_image")
