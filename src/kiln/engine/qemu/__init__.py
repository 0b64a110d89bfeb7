"""The QEMU microVM engine: one ``qemu-system-x86_64 -M microvm`` per sandbox.

    QemuEngine(QemuConfig(...))     the engine (see :mod:`.engine`)
    build_argv(VMConfig)            the QEMU command line, pure (see :mod:`.argv`)
    decide_accel(...)               KVM or TCG, pure (see :mod:`.accel`)

Snapshots keep guest RAM in a per-sandbox file (see :mod:`.snapshot`); forks and
saved images are a capture of it (:mod:`.capture`) and a clone (:mod:`.clone`).
"""

from .accel import Accel, AccelDecision, HostFacts, decide_accel
from .argv import Drive, NetDevice, VMConfig, build_argv
from .config import QemuConfig
from .engine import QemuEngine

__all__ = [
    "Accel",
    "AccelDecision",
    "Drive",
    "HostFacts",
    "NetDevice",
    "QemuConfig",
    "QemuEngine",
    "VMConfig",
    "build_argv",
    "decide_accel",
]
