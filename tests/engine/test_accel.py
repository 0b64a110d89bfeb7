"""Choosing the accelerator: the pure decision, and the host facts it is made from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kiln.engine.errors import EngineUnavailable
from kiln.engine.qemu.accel import (
    Accel,
    HostFacts,
    decide_accel,
    host_facts,
    kvm_create_vm_works,
    probe_boot,
)
from kiln.engine.qemu.argv import build_probe_argv, host_tsc_khz

PVM = HostFacts(kvm_pvm=True, kvm_usable=True, detail="KVM_CREATE_VM works")
GOOD_KVM = HostFacts(kvm_pvm=False, kvm_usable=True, detail="KVM_CREATE_VM works")
NO_KVM = HostFacts(kvm_pvm=False, kvm_usable=False, detail="cannot open /dev/kvm")


def test_tcg_when_configured_whatever_the_host() -> None:
    for facts in (PVM, GOOD_KVM, NO_KVM):
        assert decide_accel("tcg", facts).accel is Accel.TCG


def test_auto_never_uses_paravirtual_nested_kvm() -> None:
    decision = decide_accel("auto", PVM)
    assert decision.accel is Accel.TCG
    assert not decision.needs_probe
    assert "kvm_pvm" in decision.reason


def test_auto_without_a_usable_dev_kvm_is_tcg() -> None:
    decision = decide_accel("auto", NO_KVM)
    assert decision.accel is Accel.TCG
    assert "cannot open" in decision.reason


def test_auto_with_kvm_asks_for_a_probe_boot_and_follows_it() -> None:
    pending = decide_accel("auto", GOOD_KVM)
    assert pending.needs_probe and pending.accel is Accel.TCG
    assert decide_accel("auto", GOOD_KVM, probe_ok=True).accel is Accel.KVM
    assert decide_accel("auto", GOOD_KVM, probe_ok=False).accel is Accel.TCG


def test_kvm_when_configured_needs_a_usable_device() -> None:
    assert decide_accel("kvm", GOOD_KVM).accel is Accel.KVM
    assert decide_accel("kvm", PVM).accel is Accel.KVM  # the operator insists
    with pytest.raises(EngineUnavailable, match="not usable"):
        decide_accel("kvm", NO_KVM)


def test_unknown_setting() -> None:
    with pytest.raises(EngineUnavailable, match="accel must be one of"):
        decide_accel("hvf", GOOD_KVM)


def test_missing_device(tmp_path: Path) -> None:
    ok, detail = kvm_create_vm_works(tmp_path / "kvm")
    assert not ok and "cannot open" in detail


def test_not_a_kvm_device(tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    ok, detail = kvm_create_vm_works(fake)
    assert not ok and "KVM" in detail


@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="host without kvm_pvm")
def test_this_host_with_kvm_pvm_runs_tcg() -> None:
    facts = host_facts()
    assert facts.kvm_pvm
    assert decide_accel("auto", facts).accel is Accel.TCG


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")
def test_create_vm_on_the_real_device() -> None:
    ok, detail = kvm_create_vm_works()
    assert ok, detail


@pytest.fixture(scope="module")
def kernel() -> Path:
    from kiln.images import ensure_image  # noqa: PLC0415 -- builds on first use

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    return ensure_image("minimal").kernel


@pytest.mark.vm
async def test_probe_boot_succeeds_under_tcg(kernel: Path, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    argv = build_probe_argv("qemu-system-x86_64", kernel, Accel.TCG, console, host_tsc_khz())
    ok, detail = await probe_boot(argv, console, timeout=60)
    assert ok, detail


@pytest.mark.vm
@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="host without kvm_pvm")
async def test_probe_boot_fails_under_paravirtual_kvm(kernel: Path, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    argv = build_probe_argv("qemu-system-x86_64", kernel, Accel.KVM, console, host_tsc_khz())
    ok, detail = await probe_boot(argv, console, timeout=20)
    assert not ok, detail
