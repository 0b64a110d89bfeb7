"""Saved images of the QEMU engine (real TCG microVMs): a save of a sandbox running a
background HTTP server and a counting process; two sandboxes from it have its files,
its server answering and its process still counting in memory, each under its own
identity; the image lives in ``<data_dir>/saved/<id>`` until deleted, independent of
its sandbox and of templates."""

from __future__ import annotations

import time

import pytest

from kiln.agent_client import AgentClient
from kiln.engine import SandboxSpec, VolumeSpec
from kiln.engine.errors import ImageNotFound, InvalidSpec, InvalidState, SandboxNotFound
from kiln.engine.qemu import QemuEngine

from .test_fork import COUNTER, counting, identity, sh

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]

PORT = 8123
GET = "import urllib.request as u, sys; sys.stdout.write(u.urlopen(sys.argv[1]).read().decode())"


def spec(sid: str) -> SandboxSpec:
    return SandboxSpec(sandbox_id=sid, name=sid, memory_mb=256, env={"WHO": "saved"})


async def served(client: AgentClient, path: str) -> str:
    """The body of ``path`` from the HTTP server inside the sandbox."""
    return await sh(client, f"python3 -c '{GET}' http://127.0.0.1:{PORT}/{path}")


async def test_two_sandboxes_from_a_saved_image_run_its_server(engine: QemuEngine) -> None:
    await engine.create(spec("src"))
    src = await engine.agent("src")
    await sh(src, "echo from-disk > /workspace/page.txt")
    await src.write_file("/tmp/counter.py", COUNTER.encode())
    await sh(src, "setsid nohup python3 /tmp/counter.py >/dev/null 2>&1 &")
    await src.start_process(
        ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(PORT)], cwd="/workspace"
    )
    token, _ = await counting(src)
    deadline = time.monotonic() + 30
    while (await src.exec(["python3", "-c", GET, f"http://127.0.0.1:{PORT}/page.txt"])).exit_code:
        assert time.monotonic() < deadline, "the server never answered"

    saved = await engine.save_image("src", "img-server")
    assert saved.memory and saved.size_bytes > 0
    assert (saved.image, saved.cpus, saved.memory_mb) == ("minimal", 1, 256)
    assert engine.last_fork_pause_ms is not None and engine.last_fork_pause_ms > 0
    root = engine.config.saved_dir / "img-server"
    assert {p.name for p in root.iterdir()} >= {"saved.json", "ram", "state.bin", "snapshot.json"}
    # The source goes on, and nothing of it is needed any more.
    assert (await counting(src))[0] == token
    await engine.destroy("src")

    made = {}
    for sid in ("one", "two"):
        info = await engine.create(SandboxSpec(sandbox_id=sid, name=sid, **saved.spec_fields()))
        assert (info.memory_mb, info.image) == (256, "minimal")
        made[sid] = (info, await engine.agent(sid))
    for _, client in made.values():
        assert await served(client, "page.txt") == "from-disk\n"  # its server, no restart
        assert (await counting(client))[0] == token  # its process, with its memory
        assert await sh(client, 'printf %s "$WHO"') == "saved"
    ids = {sid: await identity(client) for sid, (_, client) in made.items()}
    assert (ids["one"]["hostname"], ids["two"]["hostname"]) == ("one", "two")
    assert ids["one"]["mac"] == engine.network.mac_for("one") != ids["two"]["mac"]
    assert f" {made['one'][0].ip}/" in ids["one"]["addr"]
    assert made["one"][0].ip != made["two"][0].ip
    assert ids["one"]["rng"] != ids["two"]["rng"]
    for entry in ids.values():
        assert abs(float(entry["clock"]) - time.time()) < 5
    assert engine.client("one").token != engine.client("two").token
    # Ordinary sandboxes: they go cold and come back with the server still there.
    await engine.stop("one")
    assert await served(await engine.agent("one"), "page.txt") == "from-disk\n"
    # They diverge.
    await sh(made["two"][1], "echo two-only > /workspace/mine.txt")
    assert await sh(made["one"][1], "test -e /workspace/mine.txt || echo absent") == "absent\n"


async def test_deleting_the_image_leaves_its_sandboxes(engine: QemuEngine) -> None:
    await engine.delete_saved_image("img-server")
    assert not (engine.config.saved_dir / "img-server").exists()
    await engine.delete_saved_image("img-server")  # idempotent
    with pytest.raises(ImageNotFound):
        await engine.create(
            SandboxSpec(sandbox_id="late", name="late", memory_mb=256, snapshot="img-server")
        )
    assert (await sh(await engine.agent("two"), "cat /workspace/page.txt")) == "from-disk\n"
    for sid in ("one", "two"):
        await engine.destroy(sid)


async def test_what_cannot_be_saved_or_made(engine: QemuEngine) -> None:
    with pytest.raises(SandboxNotFound):
        await engine.save_image("nope", "img-nope")
    await engine.create(spec("plain"))
    saved = await engine.save_image("plain", "img-plain")
    with pytest.raises(InvalidState, match="already exists"):
        await engine.save_image("plain", "img-plain")
    with pytest.raises(InvalidSpec, match="invalid saved image id"):
        await engine.save_image("plain", "../escape")
    fields = saved.spec_fields()
    with pytest.raises(InvalidSpec, match="vCPUs, memory and image"):
        await engine.create(
            SandboxSpec(sandbox_id="big", name="big", **{**fields, "memory_mb": 512})
        )
    with pytest.raises(InvalidSpec, match="no volumes"):
        await engine.create(
            SandboxSpec(
                sandbox_id="vol",
                name="vol",
                volumes=(VolumeSpec("v", "/mnt/v", 8),),
                **fields,
            )
        )
    with pytest.raises(InvalidState, match="already exists"):
        await engine.create(SandboxSpec(sandbox_id="plain", name="plain", **fields))
    assert not list(engine.config.saved_dir.glob(".*"))  # no half-made image left
    withvol = SandboxSpec(
        sandbox_id="withvol",
        name="withvol",
        memory_mb=256,
        volumes=(VolumeSpec("sv", "/mnt/v", 8),),
    )
    await engine.create(withvol)
    with pytest.raises(InvalidState, match="volume"):
        await engine.save_image("withvol", "img-vol")
    assert not (engine.config.saved_dir / "img-vol").exists()
    await engine.destroy("withvol")
    await engine.delete_volume("sv")
    await engine.destroy("plain")
    await engine.delete_saved_image("img-plain")


async def test_orphan_cleanup_removes_an_unfinished_save(engine: QemuEngine) -> None:
    # What a daemon killed in the middle of a save leaves: its temporary directory.
    half = engine.config.saved_dir / ".img-crashed.tmp"
    half.mkdir(parents=True)
    (half / "ram").write_bytes(b"\0" * 4096)
    removed = await engine.cleanup_orphans()
    assert f"unfinished saved image {half}" in removed
    assert not half.exists()
