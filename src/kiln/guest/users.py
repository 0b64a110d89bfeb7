"""The sandbox user and the files it owns: the set-up a VM's PID 1 and a container's
agent share (kept apart from :mod:`.pid1`, whose ctypes a container never needs)."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd

from kiln.protocol import SANDBOX_UID

from .errors import SetupError

log = logging.getLogger(__name__)


def ensure_user(name: str) -> pwd.struct_passwd:
    """The sandbox user, created (uid 1000 if free) when the image lacks it."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    uid = SANDBOX_UID
    while uid in used:
        uid += 1
    home = f"/home/{name}"
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    with open("/etc/passwd", "a") as f:
        f.write(f"{name}:x:{uid}:{uid}::{home}:{shell}\n")
    with open("/etc/group", "a") as f:
        f.write(f"{name}:x:{uid}:\n")
    if os.path.exists("/etc/shadow"):
        with open("/etc/shadow", "a") as f:
            f.write(f"{name}:!:19000:0:99999:7:::\n")
    own_dir(home, uid, uid)
    try:
        _sudo_like_the_image_user(name)
    except OSError as exc:
        log.error("boot: sudo for %s: %s", name, exc)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise SetupError(f"created user {name} but cannot look it up") from None


#: The image's passwordless sudo for its own user (kiln.images.rootfs.SUDOERS_FILE).
IMAGE_SUDOERS = "/etc/sudoers.d/kiln-sandbox"


def _sudo_like_the_image_user(name: str) -> None:
    """A default user the guest creates (E2B's ``user``) gets what the image gives its
    own: passwordless sudo, where the image has it. sudo reads a sudoers.d file only if
    root owns it and nobody else may write it (0440), and skips names with a dot: the
    file appears whole, by rename."""
    if not os.path.exists(IMAGE_SUDOERS):
        return
    path = f"/etc/sudoers.d/kiln-{name}"
    tmp = f"/etc/sudoers.d/.kiln-{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o440)
    try:
        os.write(fd, f"{name} ALL=(ALL:ALL) NOPASSWD: ALL\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def own_dir(path: str, uid: int, gid: int) -> None:
    os.makedirs(path, exist_ok=True)
    os.chown(path, uid, gid)


def write_owned(path: str, content: bytes, mode: int, uid: int, gid: int) -> None:
    parent = os.path.dirname(path)
    missing = []
    while parent and not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        os.chown(directory, uid, gid)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
