"""The QEMU command line for one microVM: a pure function of a :class:`VMConfig`.

The recipe (measured on TCG hosts, see the dev-host notes):

- ``-M microvm`` with ``pit=on,pic=on`` (TCG boots hang without them),
  ``rtc=on,isa-serial=on`` and no option ROMs;
- TCG: ``-accel tcg,tb-size=64`` (caps QEMU's translation cache: 586 → 246 MiB)
  and ``-cpu qemu64,+rdrand`` (no entropy wait), plus ``tsc_early_khz=<host>
  tsc=reliable`` on the kernel command line (without them ~1 boot in 10 hangs);
  KVM: ``-accel kvm -cpu host``;
- guest RAM in ``memory-backend-file,share=on`` on a per-sandbox file, so the
  RAM *is* the snapshot (see :mod:`.snapshot`);
- virtio-blk disks in order (rootfs = vda, config drive = vdb, volumes = vdc…),
  virtio-net on a TAP that already exists, QMP on a Unix socket, the serial
  console appended to a log file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .accel import Accel

MICROVM: Final = "microvm,x-option-roms=off,rtc=on,isa-serial=on,pit=on,pic=on"
DRIVE_FORMATS: Final = ("raw", "qcow2")


@dataclass(frozen=True, slots=True)
class Drive:
    path: str
    format: str = "raw"
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class NetDevice:
    tap: str
    mac: str


@dataclass(frozen=True, slots=True)
class VMConfig:
    """Everything that decides a QEMU command line (no I/O, no defaults from the host).

    ``kernel_args`` is the whole kernel command line except the TSC parameters, which
    the builder adds under TCG (``tsc_khz``: the host's CPU clock in kHz).
    ``ram_path`` None means anonymous guest RAM (probe boots). ``qmp_socket`` may be
    relative: QEMU resolves it against its working directory, which keeps long data
    directories within the 108-byte Unix socket limit.
    """

    name: str
    qemu: str
    kernel: str
    accel: Accel
    cpus: int
    memory_mb: int
    console_log: str
    initrd: str | None = None
    qmp_socket: str | None = None
    ram_path: str | None = None
    #: ``share=on``: the guest writes into ``ram_path`` (the file is the snapshot);
    #: off: a private copy-on-write mapping of it (the file is never written).
    ram_shared: bool = True
    drives: tuple[Drive, ...] = ()
    net: NetDevice | None = None
    kernel_args: tuple[str, ...] = ()
    tsc_khz: int | None = None
    tb_size_mb: int = 64
    pidfile: str | None = None
    daemonize: bool = True
    incoming: bool = False
    no_reboot: bool = True


def qemu_escape(value: str) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option (a comma is doubled)."""
    return value.replace(",", ",,")


def kernel_cmdline(cfg: VMConfig) -> str:
    """``kernel_args`` plus, under TCG, the TSC parameters (unless already given)."""
    args = list(cfg.kernel_args)
    tsc_given = any(a.startswith("tsc_early_khz=") for a in args)
    if cfg.accel is Accel.TCG and cfg.tsc_khz and not tsc_given:
        args += [f"tsc_early_khz={cfg.tsc_khz}", "tsc=reliable"]
    for arg in args:
        if not arg or any(c.isspace() for c in arg):
            raise ValueError(f"kernel argument {arg!r} is empty or contains whitespace")
    return " ".join(args)


def build_argv(cfg: VMConfig) -> list[str]:
    """The full argv (``argv[0]`` is the QEMU binary) for ``cfg``."""
    if cfg.cpus < 1 or cfg.memory_mb < 1:
        raise ValueError(f"cpus and memory must be positive, got {cfg.cpus}/{cfg.memory_mb}")
    machine = MICROVM
    if cfg.ram_path is not None:
        machine += ",memory-backend=mem"
    argv = [cfg.qemu, "-name", qemu_escape(f"kiln-{cfg.name}"), "-M", machine]
    if cfg.accel is Accel.KVM:
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={cfg.tb_size_mb}", "-cpu", "qemu64,+rdrand"]
    argv += ["-smp", str(cfg.cpus), "-m", f"{cfg.memory_mb}M"]
    if cfg.ram_path is not None:
        argv += [
            "-object",
            f"memory-backend-file,id=mem,size={cfg.memory_mb}M,"
            f"mem-path={qemu_escape(cfg.ram_path)},share={'on' if cfg.ram_shared else 'off'}",
        ]
    argv += ["-nodefaults", "-no-user-config", "-nographic"]
    argv += ["-kernel", cfg.kernel]
    if cfg.initrd is not None:
        argv += ["-initrd", cfg.initrd]
    argv += ["-append", kernel_cmdline(cfg)]
    for i, drive in enumerate(cfg.drives):
        if drive.format not in DRIVE_FORMATS:
            raise ValueError(f"drive format must be one of {DRIVE_FORMATS}, got {drive.format!r}")
        opts = (
            f"id=disk{i},file={qemu_escape(drive.path)},format={drive.format},"
            "if=none,cache=writeback,aio=threads,discard=unmap"
        )
        if drive.read_only:
            opts += ",readonly=on"
        argv += ["-drive", opts, "-device", f"virtio-blk-device,drive=disk{i}"]
    if cfg.net is not None:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={cfg.net.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net0,mac={cfg.net.mac}",
        ]
    argv += [
        "-chardev",
        f"file,id=console,path={qemu_escape(cfg.console_log)},append=on",
        "-serial",
        "chardev:console",
    ]
    if cfg.qmp_socket is not None:
        argv += ["-qmp", f"unix:{qemu_escape(cfg.qmp_socket)},server=on,wait=off"]
    if cfg.no_reboot:
        argv.append("-no-reboot")
    if cfg.daemonize:
        argv.append("-daemonize")
        if cfg.pidfile is not None:
            argv += ["-pidfile", cfg.pidfile]
    if cfg.incoming:
        argv += ["-incoming", "defer"]
    return argv


PROBE_KERNEL_ARGS: Final = ("console=ttyS0", "quiet", "panic=-1", "reboot=t")


def build_probe_argv(
    qemu: str, kernel: Path, accel: Accel, console_log: Path, tsc_khz: int | None = None
) -> list[str]:
    """A foreground QEMU that boots ``kernel`` with no disks until its root-mount panic.

    The panic message is printed even with ``quiet``; ``-no-reboot`` ends QEMU.
    """
    cfg = VMConfig(
        name="accel-probe",
        qemu=qemu,
        kernel=str(kernel),
        accel=accel,
        cpus=1,
        memory_mb=256,
        console_log=str(console_log),
        kernel_args=PROBE_KERNEL_ARGS,
        tsc_khz=tsc_khz,
        daemonize=False,
    )
    return build_argv(cfg)


def parse_cpu_mhz(cpuinfo: str) -> float | None:
    """The first ``cpu MHz`` value of a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "cpu MHz":
            try:
                mhz = float(value)
            except ValueError:
                return None
            return mhz if mhz > 0 else None
    return None


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host CPU frequency in kHz (for ``tsc_early_khz``), None if unknown."""
    try:
        mhz = parse_cpu_mhz(cpuinfo.read_text())
    except OSError:
        return None
    return round(mhz * 1000) if mhz else None
