"""The rootfs step: Debian sources selection, sizing, and ext4 from a tree (no mount)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from kiln.guest.users import IMAGE_SUDOERS
from kiln.images import Image
from kiln.images.rootfs import (
    SUDOERS_FILE,
    AptSource,
    BaseSpec,
    GiB,
    MiB,
    allow_sudo,
    ext4_size,
    host_debian_sources,
    make_ext4,
    sources_text,
    tree_usage,
)

DEBIAN_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
"""

THIRD_PARTY = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Signed-By: /usr/share/keyrings/nodesource.gpg

Types: deb
URIs: https://download.example.com/linux/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/example.gpg
"""

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
ONE_LINE = f"""\
deb [signed-by={KEYRING}] http://mirror.local/debian bookworm main
deb https://download.docker.com/linux/debian bookworm stable
# deb http://deb.debian.org/debian bookworm main
deb http://mirror.local/debian bookworm-updates main contrib
"""


def test_only_debian_main_sources_for_the_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
    (tmp_path / "sources.list.d/vendor.sources").write_text(THIRD_PARTY)
    (tmp_path / "sources.list.d/nodesource.sources.disabled").write_text(THIRD_PARTY)
    (tmp_path / "sources.list").write_text(ONE_LINE)
    found = host_debian_sources("bookworm", tmp_path)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert found == [
        AptSource("http://deb.debian.org/debian", ("bookworm", "bookworm-updates"), keyring),
        AptSource("http://deb.debian.org/debian-security", ("bookworm-security",), keyring),
        AptSource("http://mirror.local/debian", ("bookworm",), keyring),
        AptSource("http://mirror.local/debian", ("bookworm-updates",), None),
    ]
    text = sources_text(found)
    assert "nodesource" not in text and "example.com" not in text and "docker" not in text
    assert text.count("Components: main\n") == 4


def test_no_sources_means_mmdebstrap_default(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert host_debian_sources("bookworm", tmp_path) == []


def test_base_key_covers_its_inputs() -> None:
    spec = BaseSpec("bookworm", "minbase", ("python3", "git"))
    assert spec.key() == BaseSpec("bookworm", "minbase", ("git", "python3")).key()
    assert spec.key() != BaseSpec("trixie", "minbase", ("python3", "git")).key()
    assert spec.key() != BaseSpec("bookworm", "minbase", ("python3",)).key()
    assert spec.key() != BaseSpec("bookworm", "essential", ("python3", "git")).key()


def test_size_has_headroom_and_a_floor() -> None:
    assert ext4_size(264 * MiB) == 1 * GiB
    big = ext4_size(2 * GiB)
    assert big >= 2.5 * GiB and big % (4 * MiB) == 0


def test_tree_usage_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "a", tmp_path / "b")
    used, inodes = tree_usage(tmp_path)
    assert 100_000 <= used < 200_000
    assert inodes == 2  # the file and the root directory


def test_make_ext4_adds_the_agent_and_leaves_the_base_alone(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "usr/lib/kiln").mkdir(parents=True)
    (base / "workspace").mkdir()
    os.chown(base / "workspace", 1000, 1000)
    (base / "etc").mkdir()
    (base / "etc/hostname").write_text("kiln\n")
    agent = tmp_path / "agent.pyz"
    agent.write_bytes(b"#!/usr/bin/env python3\nPK fake")
    out = tmp_path / "rootfs.ext4"
    uuid = "12345678-1234-1234-1234-123456789abc"
    size = make_ext4(base, agent, out, tmp_path / "staging", uuid=uuid, min_size=32 * MiB)
    assert size == out.stat().st_size and 256 * MiB < size < 300 * MiB
    assert out.stat().st_blocks * 512 < size  # sparse
    assert not (tmp_path / "staging").exists()
    assert not (base / "usr/lib/kiln/agent.pyz").exists()
    info = subprocess.run(
        ["dumpe2fs", "-h", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert "kiln-root" in info and uuid in info and "has_journal" in info
    cat = subprocess.run(
        ["debugfs", "-R", "cat /usr/lib/kiln/agent.pyz", str(out)],
        capture_output=True,
        check=True,
    )
    assert cat.stdout == agent.read_bytes()
    stat = subprocess.run(
        ["debugfs", "-R", "stat /workspace", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert "User:  1000   Group:  1000" in stat


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_real_rootfs_contents(image: Image) -> None:
    def debugfs(cmd: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", cmd, str(image.rootfs)], capture_output=True, text=True, check=True
        ).stdout

    passwd = debugfs("cat /etc/passwd")
    assert "sandbox:x:1000:1000::/home/sandbox:/bin/bash" in passwd
    assert "User:  1000   Group:  1000" in debugfs("stat /workspace")
    assert "User:  1000   Group:  1000" in debugfs("stat /home/sandbox")
    assert debugfs("cat /etc/hostname") == "kiln\n"
    assert "nameserver" not in debugfs("cat /etc/resolv.conf")  # not the build host's
    for path in ("/usr/bin/python3", "/usr/bin/git", "/usr/bin/curl", "/usr/lib/kiln/agent.pyz"):
        assert "Inode:" in debugfs(f"stat {path}"), path
    # sudo for the sandbox user: setuid root, and a sudoers.d file sudo accepts (0440, root).
    assert re.search(r"Mode:\s+04755", debugfs("stat /usr/bin/sudo"))
    sudoers = debugfs(f"stat {SUDOERS_FILE}")
    assert re.search(r"Mode:\s+0440", sudoers)
    assert re.search(r"User:\s+0\s+Group:\s+0\s", sudoers)
    assert debugfs(f"cat {SUDOERS_FILE}") == "sandbox ALL=(ALL:ALL) NOPASSWD: ALL\n"
    # pip, and the wheels `python3 -m venv` seeds a new venv with.
    assert "Inode:" in debugfs("stat /usr/lib/python3/dist-packages/pip/__init__.py")
    wheels = debugfs("ls /usr/share/python-wheels")
    assert "pip-" in wheels and "setuptools-" in wheels
    # Recommends stay out (pip recommends a compiler and python3-dev).
    assert "Inode:" not in debugfs("stat /usr/bin/gcc")


def test_allow_sudo_writes_a_sudoers_file_only_root_can_change(tmp_path: Path) -> None:
    (tmp_path / "etc/sudoers.d").mkdir(parents=True)
    allow_sudo(tmp_path)  # no visudo in this tree: written without the check
    path = tmp_path / SUDOERS_FILE.lstrip("/")
    assert path.read_text() == "sandbox ALL=(ALL:ALL) NOPASSWD: ALL\n"
    assert path.stat().st_mode & 0o7777 == 0o440


def test_the_guest_knows_the_image_s_sudoers_file() -> None:
    # A default user the guest creates (E2B's "user") gets sudo only where the image
    # grants its own user sudo: both name the same file.
    assert IMAGE_SUDOERS == SUDOERS_FILE
