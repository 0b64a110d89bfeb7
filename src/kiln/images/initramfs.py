"""The initramfs: busybox, the virtio modules and an /init that hands over to the agent.

/init runs as PID 1. It mounts /proc, /sys and /dev, loads the modules in
dependency order (they are stored as ``/lib/modules/NN-name.ko``), waits for
the root disk, mounts it read-write on /newroot, unmounts what it mounted (the
guest agent mounts /proc, /sys, /dev ... itself, so nothing is left to stack
under its mounts), then ``switch_root`` execs ``/usr/bin/python3
/usr/lib/kiln/agent.pyz`` as PID 1. Console output is prefixed ``kiln-init:``.

Kernel parameters /init reads:

- ``kiln.root=/dev/vdX``: root disk (default ``/dev/vda``, the first
  ``virtio-blk-device``);
- ``kiln.initshell``: on failure, open a busybox shell on the console instead
  of powering off.

On failure /init prints ``kiln-init: FATAL: <reason>`` and powers the VM off
(QEMU exits), so a broken image fails fast instead of hanging.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .cpio import Member, write_newc
from .errors import ImageError

AGENT_PATH = "/usr/lib/kiln/agent.pyz"
PYTHON_PATH = "/usr/bin/python3"
HANDOVER_LINE = "kiln-init: handing over to the guest agent"
FATAL_PREFIX = "kiln-init: FATAL:"

# busybox applets /init and a rescue shell use (everything else: `busybox APPLET`).
APPLETS = (
    "cat",
    "cttyhack",
    "insmod",
    "ls",
    "mkdir",
    "mount",
    "poweroff",
    "reboot",
    "setsid",
    "sh",
    "sleep",
    "switch_root",
    "sync",
    "umount",
)

INIT_SCRIPT = rf"""#!/bin/sh
# kiln initramfs /init (PID 1): load virtio, mount the root disk, exec the guest agent.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
root=/dev/vda
rescue=

fail() {{
    echo "{FATAL_PREFIX} $*"
    if [ -n "$rescue" ]; then
        echo "kiln-init: rescue shell on the console; leave it to power off"
        setsid cttyhack sh
    else
        echo "kiln-init: powering off (boot with kiln.initshell for a rescue shell)"
    fi
    sync
    poweroff -f
    sleep 1
    reboot -f
}}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kiln.root=*) root="${{arg#kiln.root=}}" ;;
        kiln.initshell|kiln.initshell=1) rescue=1 ;;
    esac
done

for mod in /lib/modules/*.ko; do
    [ -e "$mod" ] || continue
    insmod "$mod" || fail "insmod $mod failed"
done

tries=0
while [ ! -b "$root" ]; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ]; then
        fail "root disk $root did not appear within 5 s (attach a virtio-blk-device)"
    fi
    sleep 0.05
done

mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root (ext4) on /newroot"
[ -x "/newroot{PYTHON_PATH}" ] || fail "$root has no {PYTHON_PATH}"
[ -f "/newroot{AGENT_PATH}" ] || fail "$root has no {AGENT_PATH}"

read -r uptime _ < /proc/uptime
umount /dev && umount /sys && umount /proc || fail "cannot unmount /dev, /sys, /proc"
echo "{HANDOVER_LINE}: exec {PYTHON_PATH} {AGENT_PATH} as PID 1 (root $root) at $uptime s"
exec switch_root /newroot {PYTHON_PATH} {AGENT_PATH}
fail "switch_root to $root failed"
"""


def is_static_elf(data: bytes) -> bool:
    """True for a 64-bit ELF executable without a program interpreter (PT_INTERP)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    e_phoff = int.from_bytes(data[0x20:0x28], "little")
    e_phentsize = int.from_bytes(data[0x36:0x38], "little")
    e_phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(e_phnum):
        start = e_phoff + i * e_phentsize
        p_type = int.from_bytes(data[start : start + 4], "little")
        if p_type == 3:  # PT_INTERP
            return False
    return True


def build_initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The uncompressed newc archive: /init, /bin/busybox + applet links, modules.

    ``modules`` are ``(file name, ELF bytes)`` pairs whose names sort in load order.
    """
    if not is_static_elf(busybox):
        raise ImageError(
            "busybox is not a static executable; install the Debian package busybox-static"
        )
    members = [
        Member.directory("bin"),
        Member.directory("dev"),
        Member.chardev("dev/console", 5, 1),
        Member.chardev("dev/null", 1, 3, 0o666),
        Member.directory("lib"),
        Member.directory("lib/modules"),
        Member.directory("newroot"),
        Member.directory("proc"),
        Member.directory("sys"),
        Member.directory("tmp", 0o1777),
        Member.file("bin/busybox", busybox, 0o755),
        Member.file("init", INIT_SCRIPT.encode(), 0o755),
    ]
    members += [Member.symlink(f"bin/{applet}", "busybox") for applet in APPLETS]
    members += [Member.file(f"lib/modules/{name}", elf) for name, elf in modules]
    return write_newc(members)


def host_busybox() -> bytes:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists():
            return candidate.read_bytes()
    raise ImageError("busybox not found; install the Debian package busybox-static")
