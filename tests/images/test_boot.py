"""Boot the real image under QEMU (TCG, no network device) and watch the serial console."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kiln.images import Image, kernel_cmdline_defaults
from kiln.images.initramfs import FATAL_PREFIX, HANDOVER_LINE

from .conftest import BootedVM

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


AGENT_READY = "kiln.guest.agent: agent ready (vm)"


def test_init_hands_over_to_the_agent_as_pid1(image: Image, boot: Callable[..., BootedVM]) -> None:
    vm = boot(image)
    handover = vm.wait_for(HANDOVER_LINE, timeout=60)
    ready = vm.wait_for(AGENT_READY, timeout=60)
    print(f"handover after {handover:.2f} s, agent ready after {handover + ready:.2f} s")
    console = vm.text()
    ready_line = next(line for line in console.splitlines() if AGENT_READY in line)
    assert ready_line.startswith("kiln-guest[1] "), ready_line  # the agent's pid is 1
    assert FATAL_PREFIX not in console
    assert "Kernel panic" not in console
    assert vm.proc.poll() is None, console


def test_missing_root_disk_fails_fast_and_powers_off(
    image: Image, boot: Callable[..., BootedVM]
) -> None:
    vm = boot(image, "kiln.root=/dev/vdz")
    vm.proc.wait(60)
    console = vm.text()
    assert f"{FATAL_PREFIX} root disk /dev/vdz did not appear" in console
    assert "powering off" in console
    assert HANDOVER_LINE not in console


def test_cmdline_defaults() -> None:
    params = kernel_cmdline_defaults(2_596_130)
    assert params[0] == "console=ttyS0"
    assert {"panic=-1", "quiet", "tsc=reliable", "tsc_early_khz=2596130"} <= set(params)
    assert not any(p.startswith(("root=", "tsc")) for p in kernel_cmdline_defaults(tcg=False))
    assert all(p and " " not in p for p in params)
    # cpu_khz=0: the caller adds its own TSC parameters (the QEMU engine does)
    assert not any(p.startswith("tsc") for p in kernel_cmdline_defaults(cpu_khz=0))
