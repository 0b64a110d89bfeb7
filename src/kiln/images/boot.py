"""How to boot an :class:`~kiln.images.Image`: the kernel command line it expects.

The engine boots ``image.kernel`` (ELF vmlinux, PVH entry) with ``image.initrd``
and attaches a *copy* of ``image.rootfs`` as the first ``virtio-blk-device``
(``/dev/vda``). The initramfs mounts it and execs the guest agent as PID 1; no
``root=`` parameter is needed. A recipe measured under TCG on the dev hosts::

    qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=on,isa-serial=on,pit=on,pic=on \\
        -accel tcg,tb-size=64 -cpu qemu64,+rdrand -m 512 -smp 1 \\
        -nodefaults -no-user-config -nographic -no-reboot \\
        -kernel IMAGE/vmlinux -initrd IMAGE/initramfs.cpio \\
        -append "$(kernel_cmdline_defaults()) kiln.ip=..." \\
        -drive id=root,file=COPY-OF-rootfs.ext4,format=raw,if=none,cache=unsafe \\
        -device virtio-blk-device,drive=root \\
        -serial file:console.log      # or -serial stdio / chardev

``-no-reboot`` matters: with ``panic=-1`` a kernel panic (or a failed /init)
reboots, and ``-no-reboot`` turns that into QEMU exiting.
"""

from __future__ import annotations

import re
from pathlib import Path


def host_cpu_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host CPU clock in kHz from /proc/cpuinfo (``cpu MHz``), or None."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return round(float(m.group(1)) * 1000) if m else None


def kernel_cmdline_defaults(cpu_khz: int | None = None, *, tcg: bool = True) -> list[str]:
    """Kernel parameters for booting a kiln image; the engine appends its ``kiln.*`` ones.

    - ``console=ttyS0``: kernel and /init messages on the ISA serial port;
    - ``quiet``: only warnings from the kernel (``kiln-init:`` lines still show);
    - ``panic=-1 reboot=t``: reboot at once on a panic (QEMU exits with -no-reboot);
    - ``pci=off``: microvm has no PCI bus (without ``pcie=on``);
    - ``random.trust_cpu=on``: seed the RNG from RDRAND (``-cpu ...,+rdrand``);
    - ``i8042.noaux i8042.nokbd``: microvm has no PS/2 controller to probe;
    - TCG only: ``tsc_early_khz=<host kHz> tsc=reliable`` (``cpu_khz``, default
      read from /proc/cpuinfo): skip TSC calibration, which under TCG otherwise
      hangs about one boot in ten.

    The initramfs needs no ``root=``; it reads ``kiln.root=`` and
    ``kiln.initshell`` (see :mod:`kiln.images.initramfs`).
    """
    params = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "reboot=t",
        "pci=off",
        "random.trust_cpu=on",
        "i8042.noaux",
        "i8042.nokbd",
    ]
    if tcg:
        khz = cpu_khz if cpu_khz is not None else host_cpu_khz()
        if khz:
            params += [f"tsc_early_khz={khz}", "tsc=reliable"]
    return params
