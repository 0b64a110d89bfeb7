"""The initramfs archive and its /init script (booted for real in test_boot.py)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from kiln.images import ImageError
from kiln.images.cpio import read_newc
from kiln.images.initramfs import (
    AGENT_PATH,
    APPLETS,
    INIT_SCRIPT,
    build_initramfs,
    host_busybox,
    is_static_elf,
)

MODULES = [("01-virtio_ring.ko", b"\x7fELF ring"), ("02-virtio.ko", b"\x7fELF virtio")]


def test_busybox_is_static_and_bin_ls_is_not() -> None:
    assert is_static_elf(host_busybox())
    assert not is_static_elf(Path("/bin/ls").read_bytes())
    assert not is_static_elf(b"#!/bin/sh\n")


def test_dynamic_busybox_is_refused() -> None:
    with pytest.raises(ImageError, match="busybox-static"):
        build_initramfs(Path("/bin/ls").read_bytes(), MODULES)


def test_archive_contents() -> None:
    busybox = host_busybox()
    members = {m.name: m for m in read_newc(build_initramfs(busybox, MODULES))}
    init = members["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    assert init.data == INIT_SCRIPT.encode()
    assert members["bin/busybox"].data == busybox
    for applet in APPLETS:
        link = members[f"bin/{applet}"]
        assert stat.S_ISLNK(link.mode) and link.data == b"busybox"
    console = members["dev/console"]  # the kernel opens it for /init's stdio
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    for d in ("proc", "sys", "dev", "newroot"):
        assert stat.S_ISDIR(members[d].mode)
    assert [(n, members[f"lib/modules/{n}"].data) for n, _ in MODULES] == MODULES


def test_deterministic() -> None:
    assert build_initramfs(host_busybox(), MODULES) == build_initramfs(host_busybox(), MODULES)


def test_init_script_parses_with_busybox_sh(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(INIT_SCRIPT)
    subprocess.run(["/bin/busybox", "sh", "-n", str(script)], check=True)


def test_init_unmounts_before_switch_root_and_execs_the_agent() -> None:
    lines = INIT_SCRIPT.splitlines()
    umount = next(i for i, line in enumerate(lines) if line.startswith("umount /dev"))
    exec_line = next(i for i, line in enumerate(lines) if line.startswith("exec switch_root"))
    assert umount < exec_line
    assert lines[exec_line] == f"exec switch_root /newroot /usr/bin/python3 {AGENT_PATH}"
    for applet in ("mount", "umount", "insmod", "switch_root", "sleep", "poweroff", "setsid"):
        assert applet in APPLETS
