"""Choosing QEMU's accelerator at run time: KVM when it is usable, TCG otherwise.

``/dev/kvm`` existing is not enough. On the paravirtual nested KVM of some
cloud hosts (``/sys/module/kvm_pvm`` loaded) KVM_CREATE_VM works but a stock
kernel either dies with "KVM internal error ... emulation failure" or boots
~50x slower than TCG. So ``auto`` asks, in order:

1. is ``kvm_pvm`` loaded?                          → TCG
2. does ``/dev/kvm`` open and KVM_CREATE_VM work?   → if not, TCG
3. does a short probe boot under KVM reach the kernel's root-mount panic in time?
                                                     → KVM if yes, TCG if not

The decision itself (:func:`decide_accel`) is a pure function of those facts;
gathering them (:func:`host_facts`, :func:`probe_boot`) does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, Literal

from ..errors import EngineUnavailable

AccelSetting = Literal["auto", "kvm", "tcg"]
ACCEL_SETTINGS: Final = ("auto", "kvm", "tcg")

KVM_PVM_MODULE: Final = Path("/sys/module/kvm_pvm")
KVM_DEVICE: Final = Path("/dev/kvm")
_KVM_GET_API_VERSION: Final = 0xAE00
_KVM_CREATE_VM: Final = 0xAE01
_KVM_API_VERSION: Final = 12
#: The probe kernel has no root device, so it panics at the root mount; with
#: ``panic=-1`` and ``-no-reboot`` QEMU then exits. Either line proves it booted.
_PROBE_MARKERS: Final = (b"VFS: Unable to mount root", b"Kernel panic")
PROBE_TIMEOUT: Final = 15.0


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the host says about KVM, before any probe boot."""

    kvm_pvm: bool
    kvm_usable: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AccelDecision:
    accel: Accel
    reason: str
    needs_probe: bool = False


def decide_accel(setting: str, facts: HostFacts, probe_ok: bool | None = None) -> AccelDecision:
    """The accelerator for ``setting`` given the host facts and (maybe) a probe boot.

    ``probe_ok`` is None when no probe boot has run; if one is needed the decision
    says so (``needs_probe``) and is TCG until the probe result is known.
    """
    if setting not in ACCEL_SETTINGS:
        choices = ", ".join(ACCEL_SETTINGS)
        raise EngineUnavailable(f"accel must be one of {choices}, got {setting!r}")
    if setting == "tcg":
        return AccelDecision(Accel.TCG, "configured")
    if setting == "kvm":
        if not facts.kvm_usable:
            raise EngineUnavailable(f"accel 'kvm' configured but KVM is not usable: {facts.detail}")
        return AccelDecision(Accel.KVM, "configured")
    if facts.kvm_pvm:
        return AccelDecision(Accel.TCG, "kvm_pvm is loaded (paravirtual nested KVM)")
    if not facts.kvm_usable:
        return AccelDecision(Accel.TCG, f"KVM not usable: {facts.detail}")
    if probe_ok is None:
        return AccelDecision(Accel.TCG, "KVM probe boot pending", needs_probe=True)
    if probe_ok:
        return AccelDecision(Accel.KVM, "KVM probe boot succeeded")
    return AccelDecision(Accel.TCG, "KVM probe boot failed")


def kvm_create_vm_works(device: Path = KVM_DEVICE) -> tuple[bool, str]:
    """Open ``/dev/kvm``, check the API version and create (and drop) one VM."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"cannot open {device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0)
        if version != _KVM_API_VERSION:
            return False, f"KVM API version {version}, expected {_KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return False, f"KVM_CREATE_VM failed: {exc.strerror}"
    finally:
        os.close(fd)
    return True, "KVM_CREATE_VM works"


def host_facts(pvm_module: Path = KVM_PVM_MODULE, device: Path = KVM_DEVICE) -> HostFacts:
    pvm = pvm_module.exists()
    usable, detail = kvm_create_vm_works(device)
    return HostFacts(kvm_pvm=pvm, kvm_usable=usable, detail=detail)


async def probe_boot(
    argv: list[str],
    console_log: Path,
    timeout: float = PROBE_TIMEOUT,  # noqa: ASYNC109 -- a deadline for the probe QEMU
) -> tuple[bool, str]:
    """Run a probe QEMU (foreground, no disks) and check the kernel got to its panic.

    ``argv`` comes from :func:`kiln.engine.qemu.argv.build_probe_argv`; the
    process is killed if it overruns ``timeout`` (a KVM that boots 50x slower
    than TCG is as useless as one that fails).
    """
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            _, stderr = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False, f"probe boot did not finish within {timeout:.0f} s"
    elapsed = time.monotonic() - start
    console = _read_or_empty(console_log)
    if any(marker in console for marker in _PROBE_MARKERS):
        return True, f"kernel booted in {elapsed:.2f} s"
    tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
    return False, f"probe QEMU exited with {proc.returncode}: {' / '.join(tail) or 'no output'}"


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
