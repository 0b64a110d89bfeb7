"""QemuEngine behaviour that needs no VM: construction, config and lookups."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engine import Engine, EngineUnavailable, InvalidState, SandboxNotFound
from kiln.engine.qemu import QemuConfig, QemuEngine


def test_the_engine_satisfies_the_interface_and_its_constructor_does_no_io(
    tmp_path: Path,
) -> None:
    engine = QemuEngine(QemuConfig(data_dir=tmp_path / "data"))
    assert isinstance(engine, Engine)
    assert engine.name == "qemu"
    assert not (tmp_path / "data").exists()
    assert engine.accel is None  # decided on first use


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"accel": "hvf"}, "accel"),
        ({"disk_mode": "zfs"}, "disk_mode"),
        ({"boot_timeout": 0}, "boot_timeout"),
        ({"guest_aslr": "sometimes"}, "guest_aslr"),
    ],
)
def test_bad_config_is_refused(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(EngineUnavailable, match=message):
        QemuConfig(data_dir=tmp_path, **changes)  # type: ignore[arg-type]


def test_default_directories(tmp_path: Path) -> None:
    config = QemuConfig(data_dir=tmp_path)
    assert config.sandboxes_dir == tmp_path / "sandboxes"
    assert config.effective_volumes_dir == tmp_path / "volumes"
    assert QemuConfig(data_dir=tmp_path, volumes_dir=tmp_path / "v").effective_volumes_dir == (
        tmp_path / "v"
    )


async def test_unknown_sandboxes(tmp_path: Path) -> None:
    engine = QemuEngine(QemuConfig(data_dir=tmp_path))
    with pytest.raises(SandboxNotFound):
        engine.info("nope")
    with pytest.raises(SandboxNotFound):
        engine.thermal("nope")
    with pytest.raises(SandboxNotFound):
        await engine.ensure_hot("nope")
    with pytest.raises(SandboxNotFound):
        engine.export_state("nope")
    assert engine.list() == []
    await engine.destroy("nope")  # idempotent: nothing to do
    await engine.destroy("../../etc")  # never leaves the data directory
    await engine.close()


async def test_a_state_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    engine = QemuEngine(QemuConfig(data_dir=tmp_path))
    with pytest.raises(InvalidState, match="not a QEMU sandbox state"):
        await engine.import_state({"sandbox_id": "x", "alive": "hot"})
    await engine.close()
