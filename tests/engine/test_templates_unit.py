"""The pure part of template snapshots: keys, eligibility, the placeholder drive."""

from __future__ import annotations

from pathlib import Path

from kiln.engine import FileSpec, SandboxSpec
from kiln.engine.qemu import templates
from kiln.engine.qemu.layout import Paths
from kiln.guest.config import TEMPLATE_MAGIC, TEMPLATE_READY_LINE

SHAPE = {"image": "abc", "cpus": 1, "memory_mb": 512, "accel": "tcg", "kernel_args": ["x"]}


def test_the_key_is_stable_and_covers_every_field() -> None:
    key = templates.template_key(SHAPE)
    assert key == templates.template_key(dict(reversed(SHAPE.items())))
    for field, other in (("image", "abd"), ("cpus", 2), ("memory_mb", 256), ("kernel_args", [])):
        assert templates.template_key({**SHAPE, field: other}) != key
    assert templates.template_dir(Path("/t"), key) == Path("/t") / key[:24]


def test_the_qemu_identity_changes_with_the_binary(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"v1")
    first = templates.qemu_identity(str(qemu))
    qemu.write_bytes(b"v2 longer")
    assert templates.qemu_identity(str(qemu)) != first
    assert templates.qemu_identity(str(tmp_path / "missing")) == str(tmp_path / "missing")


def test_big_configs_boot_instead() -> None:
    assert templates.config_fits(SandboxSpec(sandbox_id="a", name="a"))
    small = SandboxSpec(sandbox_id="a", name="a", files=(FileSpec("/f", b"x" * 100_000),))
    assert templates.config_fits(small)
    big = SandboxSpec(sandbox_id="a", name="a", files=(FileSpec("/f", b"x" * (4 << 20)),))
    assert not templates.config_fits(big)
    assert not templates.config_fits(SandboxSpec(sandbox_id="a", name="a", init="x" * (3 << 20)))


def test_placeholder_drive(tmp_path: Path) -> None:
    drive = tmp_path / "config.img"
    templates.write_placeholder_drive(drive)
    assert drive.stat().st_size == templates.DRIVE_SIZE
    assert drive.stat().st_blocks * 512 < 64 << 10  # sparse
    assert drive.read_bytes()[: len(TEMPLATE_MAGIC)] == TEMPLATE_MAGIC


def test_console_readiness(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert not templates.console_ready(log)
    log.write_text("Linux version ...\nkiln-guest[1] INFO boot\n")
    assert not templates.console_ready(log)
    with log.open("a") as f:
        f.write(f"kiln-guest[1] INFO kiln.guest.pid1: {TEMPLATE_READY_LINE}\n")
    assert templates.console_ready(log)


def test_only_finished_matching_templates_load(tmp_path: Path) -> None:
    key = templates.template_key(SHAPE)
    paths = Paths(templates.template_dir(tmp_path, key))
    paths.root.mkdir()
    assert templates.load(tmp_path, key) is None  # nothing there
    for path in (paths.rootfs("qcow2"), paths.ram, paths.state):
        path.write_bytes(b"x")
    assert templates.load(tmp_path, key) is None  # unfinished: no template.json
    templates.finish(paths, key, "qcow2", 1234.5, {"tier": "minimal"})
    loaded = templates.load(tmp_path, key)
    assert loaded is not None and loaded.rootfs == paths.rootfs("qcow2")
    assert templates.load(tmp_path, templates.template_key({**SHAPE, "cpus": 2})) is None
    paths.state.unlink()
    assert templates.load(tmp_path, key) is None  # a file went missing


def _finished(root: Path, shape: dict[str, object]) -> templates.Template:
    key = templates.template_key(shape)
    paths = Paths(templates.template_dir(root, key))
    paths.root.mkdir()
    return templates.finish(paths, key, "qcow2", 1.0, shape)


def test_a_new_template_supersedes_the_old_one_of_its_shape(tmp_path: Path) -> None:
    shape = {"tier": "minimal", "cpus": 1, "memory_mb": 512}
    old = _finished(tmp_path, shape)
    other = _finished(tmp_path, {**shape, "cpus": 2})
    (tmp_path / "half-built").mkdir()
    old_key_dir = old.paths.root
    # The same shape built again under a new key (say the image was rebuilt).
    new_paths = Paths(tmp_path / "newkey")
    new_paths.root.mkdir()
    new = templates.finish(new_paths, "newkey", "qcow2", 1.0, shape)
    assert templates.superseded(tmp_path, new) == [old_key_dir]
    assert other.paths.root not in templates.superseded(tmp_path, new)
    assert templates.unfinished(tmp_path) == [tmp_path / "half-built"]
    assert templates.unfinished(tmp_path / "missing") == []
