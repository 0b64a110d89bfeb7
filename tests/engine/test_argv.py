"""The QEMU command line builder (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engine.qemu.accel import Accel
from kiln.engine.qemu.argv import (
    Drive,
    NetDevice,
    VMConfig,
    build_argv,
    build_probe_argv,
    kernel_cmdline,
    parse_cpu_mhz,
    qemu_escape,
)


def config(**changes: object) -> VMConfig:
    base: dict[str, object] = {
        "name": "sb1",
        "qemu": "qemu-system-x86_64",
        "kernel": "/img/vmlinux",
        "initrd": "/img/initramfs.cpio",
        "accel": Accel.TCG,
        "cpus": 2,
        "memory_mb": 512,
        "console_log": "/data/sb1/console.log",
        "qmp_socket": "qmp.sock",
        "ram_path": "/data/sb1/ram",
        "drives": (
            Drive("/data/sb1/rootfs.qcow2", "qcow2"),
            Drive("/data/sb1/config.img"),
            Drive("/vol/data.ext4"),
        ),
        "net": NetDevice("ktap0123abcd", "02:11:22:33:44:55"),
        "kernel_args": ("console=ttyS0", "quiet"),
        "tsc_khz": 2596130,
        "pidfile": "/data/sb1/qemu.pid",
    }
    base.update(changes)
    return VMConfig(**base)  # type: ignore[arg-type]


def value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def values_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_recipe() -> None:
    argv = build_argv(config())
    assert argv[0] == "qemu-system-x86_64"
    machine = value_after(argv, "-M")
    assert machine.startswith("microvm,")
    for part in ("x-option-roms=off", "rtc=on", "isa-serial=on", "pit=on", "pic=on"):
        assert part in machine.split(",")
    assert value_after(argv, "-accel") == "tcg,tb-size=64"
    assert value_after(argv, "-cpu") == "qemu64,+rdrand"
    assert value_after(argv, "-smp") == "2"
    assert value_after(argv, "-m") == "512M"
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-daemonize"):
        assert flag in argv
    assert value_after(argv, "-kernel") == "/img/vmlinux"
    assert value_after(argv, "-initrd") == "/img/initramfs.cpio"
    assert value_after(argv, "-pidfile") == "/data/sb1/qemu.pid"
    assert "-incoming" not in argv


def test_kvm_uses_host_cpu_and_no_tsc_parameters() -> None:
    argv = build_argv(config(accel=Accel.KVM))
    assert value_after(argv, "-accel") == "kvm"
    assert value_after(argv, "-cpu") == "host"
    assert "tsc_early_khz" not in value_after(argv, "-append")


def test_tsc_from_host_clock_under_tcg() -> None:
    append = value_after(build_argv(config()), "-append")
    assert append.split() == ["console=ttyS0", "quiet", "tsc_early_khz=2596130", "tsc=reliable"]
    # Unknown host clock: nothing is invented.
    assert "tsc" not in kernel_cmdline(config(tsc_khz=None))
    # Already given by the caller: not repeated.
    given = config(kernel_args=("tsc_early_khz=1000", "tsc=reliable"))
    assert kernel_cmdline(given).count("tsc_early_khz") == 1


def test_kernel_arguments_must_be_single_words() -> None:
    with pytest.raises(ValueError, match="whitespace"):
        build_argv(config(kernel_args=("a b",)))


def test_ram_is_a_shared_file_backend() -> None:
    argv = build_argv(config())
    assert "memory-backend=mem" in value_after(argv, "-M").split(",")
    backend = value_after(argv, "-object")
    assert backend == "memory-backend-file,id=mem,size=512M,mem-path=/data/sb1/ram,share=on"


def test_anonymous_ram_without_a_ram_path() -> None:
    argv = build_argv(config(ram_path=None))
    assert "-object" not in argv
    assert "memory-backend" not in value_after(argv, "-M")


def test_disks_in_order_vda_vdb_vdc() -> None:
    argv = build_argv(config())
    drives = values_after(argv, "-drive")
    devices = [d for d in values_after(argv, "-device") if d.startswith("virtio-blk")]
    assert [d.split(",")[0] for d in drives] == ["id=disk0", "id=disk1", "id=disk2"]
    assert "file=/data/sb1/rootfs.qcow2" in drives[0] and "format=qcow2" in drives[0]
    assert "file=/data/sb1/config.img" in drives[1] and "format=raw" in drives[1]
    assert "file=/vol/data.ext4" in drives[2]
    assert devices == [f"virtio-blk-device,drive=disk{i}" for i in range(3)]


def test_network_on_an_existing_tap_with_the_given_mac() -> None:
    argv = build_argv(config())
    assert value_after(argv, "-netdev") == (
        "tap,id=net0,ifname=ktap0123abcd,script=no,downscript=no"
    )
    assert "virtio-net-device,netdev=net0,mac=02:11:22:33:44:55" in values_after(argv, "-device")
    assert "-netdev" not in build_argv(config(net=None))


def test_qmp_console_and_incoming() -> None:
    argv = build_argv(config(incoming=True))
    assert value_after(argv, "-qmp") == "unix:qmp.sock,server=on,wait=off"
    assert value_after(argv, "-serial") == "chardev:console"
    assert value_after(argv, "-chardev") == ("file,id=console,path=/data/sb1/console.log,append=on")
    assert value_after(argv, "-incoming") == "defer"


def test_commas_in_paths_are_escaped() -> None:
    assert qemu_escape("/a,b") == "/a,,b"
    argv = build_argv(config(ram_path="/d,x/ram", drives=(Drive("/d,x/root.img"),)))
    assert "mem-path=/d,,x/ram," in value_after(argv, "-object")
    assert "file=/d,,x/root.img," in value_after(argv, "-drive")


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        build_argv(config(cpus=0))
    with pytest.raises(ValueError):
        build_argv(config(drives=(Drive("/x", "vmdk"),)))


def test_probe_argv_is_a_foreground_diskless_boot() -> None:
    argv = build_probe_argv("qemu", Path("/k"), Accel.KVM, Path("/c.log"))
    assert "-daemonize" not in argv and "-drive" not in argv and "-qmp" not in argv
    assert "-no-reboot" in argv
    assert value_after(argv, "-accel") == "kvm"
    assert "panic=-1" in value_after(argv, "-append")


@pytest.mark.parametrize(
    ("text", "mhz"),
    [
        ("processor\t: 0\ncpu MHz\t\t: 2596.130\ncache size\t: 1 KB\n", 2596.13),
        ("processor : 0\n", None),
        ("cpu MHz : fast\n", None),
        ("cpu MHz : 0.000\n", None),
    ],
)
def test_parse_cpu_mhz(text: str, mhz: float | None) -> None:
    assert parse_cpu_mhz(text) == mhz
