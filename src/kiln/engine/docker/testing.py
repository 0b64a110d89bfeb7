"""Helpers for tests and benchmarks that need a real, private dockerd.

    unavailable_reason()             None, or why no private dockerd can run on this machine
    private_dockerd(root)            a network namespace of its own (with kiln's bridge in
                                     it), a started :class:`~.daemon.Dockerd` inside, all of
                                     it torn down afterwards whatever happened
    busybox_rootfs_tar()             a rootfs tarball made from the host's static busybox
    import_rootfs(client, tar, tag)  ``docker import`` of a rootfs tarball
    engine_config(state, dockerd, ...) a Docker engine on such a dockerd, with its own bridge
    checkpoint(client, dockerd, id, name)  ``docker checkpoint create``, made repeatable (runsc)
    start_from_checkpoint(...)       ``docker start --checkpoint`` (the SDK has neither)

Nothing here talks to a registry: tests and CI have no network, and kiln's
images are always imported from a rootfs it built itself.

The namespace (``kd-<random>``, ``/run/netns``) keeps dockerd's bridge, the
containers' veths and their addresses off the host network even when pytest is
not run under ``unshare --net``; dockerd enters it through ``nsenter``, so its
mounts stay visible to the test (and to the leftover checks).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.network import Network, NetworkConfig

from . import checkpoints
from .config import DockerdConfig, DockerEngineConfig
from .daemon import Dockerd

#: The default bridge and subnet of :func:`private_dockerd` (inside its own namespace).
BRIDGE = "kd-br0"
SUBNET = "10.213.60.0/24"
GATEWAY = "10.213.60.1"
#: busybox applets the test image links; the binary itself is ``/bin/busybox``.
APPLETS = (
    "cat", "echo", "env", "false", "id", "ip", "kill", "ls", "mkdir", "nc", "ping",
    "ps", "rm", "sh", "sleep", "test", "touch", "true", "uname",
)  # fmt: skip
BUSYBOX = Path("/bin/busybox")
_PT_INTERP = 3


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is a 64-bit little-endian ELF without a program interpreter."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            (phoff,) = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == _PT_INTERP:
            return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`private_dockerd` cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (dockerd, network namespaces, cgroups)"
    for tool, package in (
        ("dockerd", "docker.io"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package}; scripts/bootstrap)"
    if not is_static_elf(BUSYBOX):
        return f"{BUSYBOX} is missing or not statically linked (Debian package busybox-static)"
    return None


def busybox_rootfs_tar(applets: tuple[str, ...] = APPLETS) -> bytes:
    """A tiny rootfs (``/bin/busybox`` and its applet links, ``/tmp``, ``/etc/passwd``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700)):
            add(d, tarfile.DIRTYPE, mode)
        add("bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
        for applet in applets:
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
    return buf.getvalue()


def import_rootfs(client: Any, tar: bytes, tag: str) -> str:
    """``docker import`` ``tar`` as ``tag`` (``repo:tag``); returns the tag."""
    repository, _, version = tag.partition(":")
    client.api.import_image_from_data(tar, repository=repository, tag=version or "latest")
    return tag


def checkpoint(client: Any, dockerd: Dockerd, container_id: str, name: str) -> None:
    """``docker checkpoint create`` (experimental daemons; runsc), made repeatable."""
    checkpoints.checkpoint(client, dockerd.config, container_id, name)


def start_from_checkpoint(client: Any, container_id: str, name: str) -> None:
    """``docker start --checkpoint NAME``."""
    checkpoints.start_from_checkpoint(client, container_id, name)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def private_dockerd(
    root: Path,
    *,
    subnet: str | None = SUBNET,
    bridge: str = BRIDGE,
    **changes: Any,
) -> Iterator[Dockerd]:
    """A started private dockerd in a fresh network namespace; everything removed after.

    With ``subnet`` (the default) the namespace gets kiln's bridge (made by
    :class:`kiln.network.Network`, no NAT) and dockerd's default network is it;
    with ``subnet=None`` dockerd runs with ``--bridge=none``. ``changes`` go to
    :class:`~.config.DockerdConfig`. On the way out every container is killed,
    dockerd stopped, leftovers cleared and the namespace deleted, even if the
    start failed halfway.
    """
    ns = f"kd-{secrets.token_hex(3)}"
    _ip("netns", "add", ns)
    dockerd: Dockerd | None = None
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        if subnet is not None:
            net = NetworkConfig(bridge=bridge, subnet=subnet, netns=ns, nat=False, dns=())
            with Network(net) as network:
                network.setup()
        config = DockerdConfig(
            root=root, netns=ns, bridge=bridge if subnet is not None else None, **changes
        )
        dockerd = Dockerd(config)
        dockerd.start()
        yield dockerd
    finally:
        try:
            if dockerd is not None:
                dockerd.stop()
        finally:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


def engine_config(
    state_dir: Path,
    dockerd: Dockerd,
    *,
    bridge: str,
    subnet: str,
    runtime: str = "runc",
) -> DockerEngineConfig:
    """A Docker engine on a dockerd the caller runs (``private_dockerd``), with a bridge
    of its own in that dockerd's namespace: several engines may share one dockerd."""
    network = NetworkConfig(
        bridge=bridge, subnet=subnet, netns=dockerd.config.netns, nat=False, dns=()
    )
    return DockerEngineConfig(
        state_dir=state_dir,
        dockerd=dockerd.config,
        network=network,
        runtime=runtime,
        start_dockerd=False,
    )
