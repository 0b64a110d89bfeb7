"""Fixtures for the image tests: the real cached image, and booting it under QEMU."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.images import Image, ImageError, ensure_image, kernel_cmdline_defaults
from kiln.images.builder import KERNEL_MANIFEST, resolve_inputs
from kiln.images.cache import default_image_dir

QEMU = "qemu-system-x86_64"
MICROVM = "microvm,x-option-roms=off,rtc=on,isa-serial=on,pit=on,pic=on"


@pytest.fixture(scope="session")
def image() -> Image:
    """The current ``minimal`` image from the shared cache, built if needed (~40 s cold).

    Never skipped: a host that cannot build it fails the test with the reason.
    """
    messages: list[str] = []
    try:
        return ensure_image("minimal", progress=messages.append)
    except ImageError as exc:
        pytest.fail(
            f"cannot build the minimal image: {exc}\n"
            "(the first build downloads Debian packages; inside a network namespace, build "
            "it beforehand with `python -m kiln.images ensure`)\n" + "\n".join(messages)
        )


@pytest.fixture(scope="session")
def kernel_dir(image: Image) -> Path:
    """The kernel cache entry the current image was built from."""
    inputs = resolve_inputs(image.tier)
    assert inputs is not None
    path = default_image_dir() / "kernel" / inputs.kernel_key
    assert (path / KERNEL_MANIFEST).exists()
    return path


@dataclass
class BootedVM:
    proc: subprocess.Popen[bytes]
    console: Path
    argv: list[str]

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def qemu_output(self) -> str:
        path = self.console.with_name("qemu.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, needle: str, timeout: float) -> float:
        """Seconds until ``needle`` shows on the console; fails on timeout or QEMU exit."""
        start = time.monotonic()
        while needle not in self.text():
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                pytest.fail(
                    f"QEMU exited ({rc}) before {needle!r}:\n{self.qemu_output()}\n{self.text()}"
                )
            if time.monotonic() - start > timeout:
                pytest.fail(f"no {needle!r} on the console within {timeout} s:\n{self.text()}")
            time.sleep(0.02)
        return time.monotonic() - start


def qemu_argv(
    image: Image, rootfs: Path, console: Path, extra_args: tuple[str, ...] = ()
) -> list[str]:
    """The recipe from dev-host-facts.md, under TCG, without any network device."""
    append = " ".join((*kernel_cmdline_defaults(), *extra_args))
    return [
        QEMU,
        "-M",
        MICROVM,
        "-accel",
        "tcg,tb-size=64",
        "-cpu",
        "qemu64,+rdrand",
        "-m",
        "512",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        append,
        "-drive",
        f"id=root,file={rootfs},format=raw,if=none,cache=unsafe",
        "-device",
        "virtio-blk-device,drive=root",
        "-chardev",
        f"file,id=console,path={console}",
        "-serial",
        "chardev:console",
    ]


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Callable[..., BootedVM]]:
    """``boot(image, *kernel_args) -> BootedVM``: a QEMU on a private copy of the rootfs."""
    started: list[BootedVM] = []

    def _boot(image: Image, *kernel_args: str) -> BootedVM:
        rootfs = tmp_path / "rootfs.ext4"
        subprocess.run(["cp", "--sparse=always", image.rootfs, rootfs], check=True)
        rootfs.chmod(0o644)
        console = tmp_path / "console.log"
        argv = qemu_argv(image, rootfs, console, kernel_args)
        with open(tmp_path / "qemu.log", "wb") as qemu_log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT
            )
        vm = BootedVM(proc, console, argv)
        started.append(vm)
        return vm

    yield _boot
    for vm in started:
        if vm.proc.poll() is None:
            vm.proc.terminate()
            try:
                vm.proc.wait(5)
            except subprocess.TimeoutExpired:
                vm.proc.kill()
                vm.proc.wait()
