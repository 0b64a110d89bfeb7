"""The files of one sandbox directory, and its persistent record ``sandbox.json``.

::

    <data_dir>/sandboxes/<id>/
        sandbox.json     what is needed to rebuild the QEMU command line and to
                         recover the sandbox (spec, ip, tap, mac, token, disks, accel)
        rootfs.qcow2     root disk (/dev/vda): overlay on <data_dir>/bases/<digest>/
                         (or rootfs.img, a full copy, with disk_mode "copy")
        config.img       config drive (/dev/vdb), ext4 with config.json
        config.img.due   present while config.img is not yet this sandbox's (a pool
                         claim writes it later: see .late_drive)
        slotN.img        placeholder of a template's spare volume slot nobody uses
        ram              guest RAM (memory-backend-file, share=on; none in a clone
                         that still maps its template's RAM copy-on-write)
        state.bin        device state of the last stop (snapshot)
        snapshot.json    snapshot validity and measurements (see .snapshot)
        qmp.sock         QMP socket
        qemu.pid         pid of the daemonized QEMU
        qemu.log         QEMU's own messages
        console.log      the guest's serial console
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ..base import SandboxSpec, guest_hostname
from .argv import Drive

RECORD_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Paths:
    root: Path

    @property
    def record(self) -> Path:
        return self.root / "sandbox.json"

    @property
    def config_drive(self) -> Path:
        return self.root / "config.img"

    @property
    def drive_due(self) -> Path:
        return self.root / "config.img.due"

    @property
    def ram(self) -> Path:
        return self.root / "ram"

    @property
    def state(self) -> Path:
        return self.root / "state.bin"

    @property
    def state_tmp(self) -> Path:
        return self.root / ".state.bin.tmp"

    @property
    def snapshot_meta(self) -> Path:
        return self.root / "snapshot.json"

    @property
    def qmp_socket(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    def slot(self, index: int) -> Path:
        """Placeholder disk of a template's spare volume slot ``index`` (see .templates)."""
        return self.root / f"slot{index}.img"

    def rootfs(self, fmt: str) -> Path:
        return self.root / ("rootfs.qcow2" if fmt == "qcow2" else "rootfs.img")

    @property
    def marker(self) -> str:
        """A string only this sandbox's QEMU has on its command line."""
        return f"{self.root}/"


def spec_to_json(spec: SandboxSpec) -> dict[str, Any]:
    return spec.to_json()


def spec_from_json(data: dict[str, Any]) -> SandboxSpec:
    return SandboxSpec.from_json(data)


@dataclass(slots=True)
class Record:
    """``sandbox.json``: the immutable facts of a sandbox (written once at create)."""

    spec: SandboxSpec
    dir: str
    token: str
    ip: str
    tap: str
    mac: str
    accel: str
    kernel: str
    initrd: str
    image_digest: str
    drives: tuple[Drive, ...]
    volume_paths: dict[str, str] = field(default_factory=dict)
    created_volumes: tuple[str, ...] = ()
    created_at: float = 0.0
    #: Whose TAP, MAC and firewall port these are when not the sandbox's own: a
    #: sandbox taken from the warm pool keeps its pool member's (see :mod:`.pool`).
    net_id: str | None = None

    @property
    def net_owner(self) -> str:
        """The id the TAP's name and alias and the MAC were made from."""
        return self.net_id or self.spec.sandbox_id

    def to_json(self) -> dict[str, Any]:
        out = self._json()
        if self.net_id is not None:
            out["net_id"] = self.net_id
        return out

    def _json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "spec": spec_to_json(self.spec),
            "dir": self.dir,
            "token": self.token,
            "ip": self.ip,
            "tap": self.tap,
            "mac": self.mac,
            "accel": self.accel,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "image_digest": self.image_digest,
            "drives": [asdict(d) for d in self.drives],
            "volume_paths": dict(self.volume_paths),
            "created_volumes": list(self.created_volumes),
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(
            spec=spec_from_json(data["spec"]),
            dir=str(data["dir"]),
            token=str(data["token"]),
            ip=str(data["ip"]),
            tap=str(data["tap"]),
            mac=str(data["mac"]),
            accel=str(data["accel"]),
            kernel=str(data["kernel"]),
            initrd=str(data["initrd"]),
            image_digest=str(data.get("image_digest", "")),
            drives=tuple(Drive(**d) for d in data["drives"]),
            volume_paths={str(k): str(v) for k, v in (data.get("volume_paths") or {}).items()},
            created_volumes=tuple(data.get("created_volumes") or ()),
            created_at=float(data.get("created_at", 0.0)),
            net_id=str(data["net_id"]) if data.get("net_id") else None,
        )

    @classmethod
    def load(cls, path: Path) -> Record:
        return cls.from_json(json.loads(path.read_text()))


def guest_config(
    record: Record,
    network: dict[str, Any],
    volume_devices: list[tuple[str, str, int]],
    user: str | None,
) -> dict[str, Any]:
    """The ``config.json`` of the config drive (see :mod:`kiln.guest.config`)."""
    spec = record.spec
    config = spec.guest_config(record.token)
    config["hostname"] = guest_hostname(spec.name)
    config["volumes"] = [
        {"device": device, "mount": mount, "fstype": "ext4", "size": size}
        for device, mount, size in volume_devices
    ]
    config["dns"] = list(network.get("dns", []))
    config["network"] = {
        "address": network["address"],
        "gateway": network["gateway"],
        "mac": network["mac"],
    }
    if user and not spec.user:  # the engine-wide override yields to the sandbox's own
        config["user"] = user
    return config
