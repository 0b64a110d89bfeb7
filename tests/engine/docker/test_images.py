"""The Docker engine's image: kiln's base tree imported into a real private dockerd.

Two kinds of tree: the real cached ``minimal`` base (skipped with the reason
when kiln.images has none), imported into the session's dockerd; and a small
tree made here with every kind of file (setuid, devices, capabilities, ...),
posing as the ``minimal`` base of an image directory of its own and imported
into a dockerd of this module (the two would share a reference otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from kiln.engine.docker import Dockerd
from kiln.engine.docker import images as docker_images
from kiln.engine.docker.images import (
    AGENT_PATH,
    IMPORT_VERSION,
    DockerImageError,
    agent_zipapp,
    ensure_image,
    image_exists,
)
from kiln.engine.docker.testing import BUSYBOX, private_dockerd
from kiln.engine.errors import ImageNotFound
from kiln.images import TIERS, BaseTree, find_base
from kiln.images import agent as agent_mod
from kiln.images.builder import BASE_MANIFEST
from kiln.images.cache import write_manifest

from .conftest import RUNTIMES, skip_unless_available

pytestmark = pytest.mark.netns

#: ``security.capability`` (VFS_CAP_REVISION_2, effective) granting cap_net_raw (13),
#: what ``setcap cap_net_raw=ep`` writes (ping's capability on Debian).
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


# -- comparing trees -------------------------------------------------------------------------


def tree_metadata(root: Path) -> tuple[dict[str, dict[str, Any]], list[list[str]]]:
    """Every entry below ``root`` (not root itself) → its metadata; and the hard-link groups."""
    entries: dict[str, dict[str, Any]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entries[rel] = {
                "mode": stat.filemode(st.st_mode) + f" {st.st_mode:o}",
                "owner": (st.st_uid, st.st_gid),
                "size": None if stat.S_ISDIR(st.st_mode) else st.st_size,
                "rdev": st.st_rdev,
                "mtime_ns": st.st_mtime_ns,
                "target": os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
                "xattrs": {
                    key: os.getxattr(path, key, follow_symlinks=False)
                    for key in sorted(os.listxattr(path, follow_symlinks=False))
                },
                "sha256": _digest(path) if stat.S_ISREG(st.st_mode) else None,
            }
            inodes.setdefault(st.st_ino, []).append(rel)
    return entries, sorted(sorted(group) for group in inodes.values() if len(group) > 1)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def layer_dir(client: Any, reference: str) -> Path:
    """The directory dockerd unpacked the image's one layer into (overlay2 ``diff``)."""
    attrs = client.api.inspect_image(reference)
    assert len(attrs["RootFS"]["Layers"]) == 1
    return Path(attrs["GraphDriver"]["Data"]["UpperDir"])


def assert_same_tree(source: Path, imported: Path) -> None:
    want, want_links = tree_metadata(source)
    got, got_links = tree_metadata(imported)
    assert sorted(got) == sorted(want)
    differ = {path: (want[path], got[path]) for path in want if want[path] != got[path]}
    assert differ == {}
    assert got_links == want_links


def run(client: Any, image: str, cmd: list[str], **kwargs: Any) -> bytes:
    """Run ``cmd`` in a container of ``image`` and return its stdout (raises on failure)."""
    out: bytes = client.containers.run(image, cmd, remove=True, **kwargs)
    return out


def imports_since(client: Any, since: float, base: BaseTree) -> int:
    """How many ``docker import``s of ``base`` dockerd logged since ``since`` (time.time())."""
    events = client.api.events(
        since=f"{since:.9f}",
        until=f"{time.time() + 0.001:.9f}",
        filters={"type": "image", "event": "import", "label": f"kiln.base-key={base.key}"},
        decode=True,
    )
    try:
        return len(list(events))
    finally:
        events.close()  # a drained stream still holds its socket until closed


# -- the real base tree in the session's dockerd ---------------------------------------------


@pytest.fixture(scope="module")
def real_base() -> BaseTree:
    base = find_base("minimal")
    if base is None:
        pytest.skip("no cached minimal base tree: run `python -m kiln.images ensure` first")
    return base


@pytest.fixture
def minimal(docker_client: Any, real_base: BaseTree) -> str:
    """The reference of the real minimal image (imported by the first test that needs it)."""
    return ensure_image(docker_client)


def test_concurrent_first_calls_import_once_then_hit_the_cache(
    docker_client: Any, real_base: BaseTree
) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.api.remove_image(f"kiln/minimal:{real_base.key[:16]}", force=True)
    assert not image_exists(docker_client)
    messages: list[str] = []
    since = time.time()
    barrier = threading.Barrier(4)

    def call() -> str:
        barrier.wait()
        return ensure_image(docker_client, progress=messages.append)

    with ThreadPoolExecutor(4) as pool:
        references = list(pool.map(lambda _: call(), range(4)))
    assert references == [f"kiln/minimal:{real_base.key[:16]}"] * 4
    assert imports_since(docker_client, since, real_base) == 1
    assert messages[0] == "importing the minimal rootfs into dockerd (about 10 s)…"
    assert messages[1].startswith(f"imported {references[0]} in ")
    assert len(messages) == 2
    attrs = docker_client.api.inspect_image(references[0])
    assert attrs["Config"]["Labels"] == {
        "kiln.tier": "minimal",
        "kiln.base-key": real_base.key,
        "kiln.import-version": str(IMPORT_VERSION),
    }

    since = time.time()
    started = time.monotonic()
    assert ensure_image(docker_client, progress=messages.append) == references[0]
    assert time.monotonic() - started < 1.0  # one inspect: milliseconds
    assert len(messages) == 2
    again = docker_client.api.inspect_image(references[0])
    assert (again["Id"], again["Created"]) == (attrs["Id"], attrs["Created"])
    assert imports_since(docker_client, since, real_base) == 0
    assert image_exists(docker_client)


def test_the_image_is_the_base_tree_exactly(
    docker_client: Any, real_base: BaseTree, minimal: str
) -> None:
    # Every entry: type, full mode (sudo's setuid bit), numeric owner, size,
    # content, device numbers, mtime, symlink target, xattrs, hard links.
    assert_same_tree(real_base.root, layer_dir(docker_client, minimal))
    assert oct(os.lstat(real_base.root / "usr/bin/sudo").st_mode) == "0o104755"
    assert not (real_base.root / AGENT_PATH.lstrip("/")).exists()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_containers_of_the_image_run_python_and_sudo(
    docker_client: Any, minimal: str, runtime: str
) -> None:
    mode = "import os; print(oct(os.stat('/usr/bin/sudo').st_mode))"
    assert run(docker_client, minimal, ["python3", "-c", mode], runtime=runtime) == b"0o104755\n"
    # No agent in the image: the engine bind-mounts it.
    run(docker_client, minimal, ["test", "!", "-e", AGENT_PATH], runtime=runtime)
    if runtime == "runc":
        # Not under Debian's runsc (2022): it runs every process with no_new_privs
        # (setuid is ignored, gVisor issue 5299), and it rejects statx with
        # AT_NO_AUTOMOUNT, which coreutils' stat and ls -l use.
        assert run(docker_client, minimal, ["stat", "-c", "%a", "/usr/bin/sudo"]) == b"4755\n"
        # The setuid bit works, not only shows: the sandbox user becomes root.
        assert run(docker_client, minimal, ["sudo", "-n", "id", "-u"], user="sandbox") == b"0\n"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_bind_mounted_agent_runs(
    docker_client: Any, minimal: str, runtime: str, tmp_path: Path
) -> None:
    agent = agent_zipapp(tmp_path)
    out = run(
        docker_client,
        minimal,
        ["python3", AGENT_PATH, "--help"],
        volumes={str(agent): {"bind": AGENT_PATH, "mode": "ro"}},
        runtime=runtime,
    )
    assert b"kiln guest agent" in out


# -- made-up trees in a dockerd of this module -----------------------------------------------


@pytest.fixture(scope="module")
def own_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    skip_unless_available()
    with private_dockerd(tmp_path_factory.mktemp("dockerd"), subnet=None) as daemon:
        yield daemon


@pytest.fixture
def own_dockerd(own_daemon: Dockerd) -> Iterator[Any]:
    """A client of the module's dockerd, left without kiln images or containers after each test."""
    with contextlib.closing(own_daemon.client()) as client:
        try:
            yield client
        finally:
            for container in client.containers.list(all=True):
                container.remove(force=True)
            for image in client.api.images(filters={"label": "kiln.tier"}):
                client.api.remove_image(image["Id"], force=True)


def make_tree(root: Path) -> None:
    """A small runnable tree with one of everything a Debian root can hold."""
    for d in ("bin", "dev", "etc", "usr/bin", "usr/lib/kiln", "empty/nested"):
        (root / d).mkdir(parents=True)
    (root / "bin/busybox").write_bytes(BUSYBOX.read_bytes())
    (root / "bin/busybox").chmod(0o755)
    for applet in ("sh", "stat", "id", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\nuser:x:1234:5678::/:/bin/sh\n")
    setuid = root / "usr/bin/setuid"
    setuid.write_bytes(b"#!/bin/sh\n")
    setuid.chmod(0o4755)
    setgid = root / "usr/bin/setgid"
    setgid.write_bytes(b"#!/bin/sh\n")
    os.chown(setgid, 0, 42)
    setgid.chmod(0o2755)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    shared = root / "shared"
    shared.mkdir()
    os.chown(shared, 0, 100)
    shared.chmod(0o2775)
    owned = root / "owned"
    owned.write_text("private\n")
    os.chown(owned, 1234, 5678)
    owned.chmod(0o640)
    os.link(owned, root / "owned-hardlink")
    (root / "usr/bin/abs").symlink_to("/bin/busybox")
    (root / "usr/bin/rel").symlink_to("../../bin/busybox")
    (root / "dangling").symlink_to("nowhere")
    os.lchown(root / "dangling", 1234, 5678)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/loop7", 0o660 | stat.S_IFBLK, os.makedev(7, 7))
    os.chown(root / "dev/loop7", 0, 6)
    os.mkfifo(root / "fifo", 0o600)
    ping = root / "usr/bin/ping"
    ping.write_bytes(b"\x7fELF not really\n")
    ping.chmod(0o755)
    os.setxattr(ping, "security.capability", CAP_NET_RAW)
    os.setxattr(owned, "user.kiln", b"bin\x00ary\xff")
    (root / "spaced näme").write_text("unicode\n")
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 80)).write_text("a path longer than ustar's 100 bytes\n")
    os.utime(owned, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


@pytest.fixture
def made_up_base(tmp_path: Path) -> BaseTree:
    """An image directory whose ``minimal`` base is :func:`make_tree`'s tree."""
    if os.geteuid() != 0:
        pytest.skip("needs root (owners, device nodes, security.capability)")
    image_dir = tmp_path / "images"
    entry = image_dir / "base" / TIERS["minimal"].base.key()
    make_tree(entry / "root")
    write_manifest(entry / BASE_MANIFEST, {"made": "by test_images"})
    base = find_base("minimal", image_dir)
    assert base is not None
    return base


def test_every_kind_of_file_survives_the_import(
    own_dockerd: Any, made_up_base: BaseTree, tmp_path: Path
) -> None:
    image_dir = made_up_base.root.parent.parent.parent
    reference = ensure_image(own_dockerd, image_dir=image_dir, progress=lambda _: None)
    layer = layer_dir(own_dockerd, reference)
    assert_same_tree(made_up_base.root, layer)
    assert os.getxattr(layer / "usr/bin/ping", "security.capability") == CAP_NET_RAW
    stat_cmd = ["stat", "-c", "%a %u:%g %F", "/usr/bin/setuid", "/usr/bin/setgid", "/owned"]
    assert run(own_dockerd, reference, stat_cmd).decode().splitlines() == [
        "4755 0:0 regular file",
        "2755 0:42 regular file",
        "640 1234:5678 regular file",
    ]


def test_the_tarball_is_reproducible(made_up_base: BaseTree) -> None:
    def digest() -> str:
        with docker_images._tar(made_up_base.root) as tar:
            data = hashlib.file_digest(tar.stdout, "sha256").hexdigest()
            assert tar.failure(wait=True) is None
        return data

    first = digest()
    os.link(made_up_base.root / "owned", made_up_base.root.parent / "outside")  # moves ctime
    assert digest() == first


def test_an_import_version_bump_replaces_the_unused_old_image(
    own_dockerd: Any, made_up_base: BaseTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_dir = made_up_base.root.parent.parent.parent
    reference = ensure_image(own_dockerd, image_dir=image_dir, progress=lambda _: None)
    old = own_dockerd.api.inspect_image(reference)["Id"]
    monkeypatch.setattr(docker_images, "IMPORT_VERSION", IMPORT_VERSION + 1)
    assert not image_exists(own_dockerd, image_dir=image_dir)
    messages: list[str] = []
    assert ensure_image(own_dockerd, image_dir=image_dir, progress=messages.append) == reference
    new = own_dockerd.api.inspect_image(reference)
    assert new["Id"] != old
    assert new["Config"]["Labels"]["kiln.import-version"] == str(IMPORT_VERSION + 1)
    assert messages[-1] == f"removed the old minimal image {old}"
    with pytest.raises(docker.errors.ImageNotFound):
        own_dockerd.api.inspect_image(old)


def test_an_old_image_in_use_is_kept(
    own_dockerd: Any, made_up_base: BaseTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_dir = made_up_base.root.parent.parent.parent
    reference = ensure_image(own_dockerd, image_dir=image_dir, progress=lambda _: None)
    old = own_dockerd.api.inspect_image(reference)["Id"]
    own_dockerd.containers.create(reference, ["true"])  # a stopped sandbox
    monkeypatch.setattr(docker_images, "IMPORT_VERSION", IMPORT_VERSION + 1)
    ensure_image(own_dockerd, image_dir=image_dir, progress=lambda _: None)
    assert own_dockerd.api.inspect_image(old)["Id"] == old


def test_processes_importing_at_once_all_succeed(
    own_daemon: Dockerd, own_dockerd: Any, made_up_base: BaseTree
) -> None:
    image_dir = made_up_base.root.parent.parent.parent
    code = (
        "import docker\n"
        "from pathlib import Path\n"
        "from kiln.engine.docker.images import ensure_image\n"
        f"client = docker.DockerClient(base_url={own_daemon.url!r})\n"
        f"print(ensure_image(client, image_dir=Path({str(image_dir)!r})))\n"
        "client.close()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert len(set(outputs)) == 1
    assert image_exists(own_dockerd, image_dir=image_dir)


def test_a_failed_tar_leaves_no_image(
    own_dockerd: Any, made_up_base: BaseTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_dir = made_up_base.root.parent.parent.parent
    monkeypatch.setattr(docker_images, "TAR_ARGV", (*docker_images.TAR_ARGV, "--no-such-option"))
    with pytest.raises(
        DockerImageError, match=r"tar of .* exited with status \d+: tar: unrecognized option"
    ):
        ensure_image(own_dockerd, image_dir=image_dir, progress=lambda _: None)
    assert own_dockerd.api.images(filters={"label": "kiln.tier"}) == []


# -- no dockerd needed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "failure"),
    [
        ("exit 0", None),
        # kiln.images hard-links the tree for VM builds: the ctime moves, the content not.
        ("echo 'tar: ./a: file changed as we read it' >&2; exit 1", None),
        (
            "echo 'tar: ./a: file changed as we read it' >&2; echo 'tar: ./b: File shrank' >&2;"
            " exit 1",
            "exited with status 1: tar: ./a: file changed as we read it\ntar: ./b: File shrank",
        ),
        ("echo 'tar: ./c: Cannot open' >&2; exit 2", "exited with status 2: tar: ./c: Cannot open"),
    ],
)
def test_which_tar_failures_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, failure: str | None
) -> None:
    monkeypatch.setattr(docker_images, "TAR_ARGV", ("sh", "-c", script, "tar"))
    with docker_images._tar(tmp_path) as tar:
        assert tar.stdout.read() == b""
        found = tar.failure(wait=True)
    if failure is None:
        assert found is None
    else:
        assert found == f"tar of {tmp_path} {failure}"


def test_a_missing_base_tree_says_what_to_run(tmp_path: Path) -> None:
    not_a_client: Any = object()  # the lookup comes first: dockerd is never asked
    with pytest.raises(ImageNotFound, match=r"run `python -m kiln\.images ensure --tier minimal`"):
        ensure_image(not_a_client, image_dir=tmp_path)
    with pytest.raises(ImageNotFound, match="unknown image tier 'huge'"):
        ensure_image(not_a_client, "huge", image_dir=tmp_path)
    assert not image_exists(not_a_client, image_dir=tmp_path)


def fake_agent(text: str) -> Callable[[], Callable[[Path], Path]]:
    def build(dest: Path) -> Path:
        dest.write_bytes(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(dest, "a") as zf:
            zf.writestr(zipfile.ZipInfo("__main__.py", (1980, 1, 1, 0, 0, 0)), text)
        return dest

    return lambda: build


def test_agent_zipapp_is_built_once_per_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = agent_zipapp(tmp_path)
    assert first.parent == tmp_path / "agents"
    assert first.name == f"{agent_mod.zipapp_digest(first)}.pyz"
    assert stat.S_IMODE(first.stat().st_mode) == 0o444
    inode = first.stat().st_ino
    assert agent_zipapp(tmp_path) == first
    assert first.stat().st_ino == inode  # not rewritten: a bind mount of it stays valid
    ran = subprocess.run(
        [sys.executable, first, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert ran.returncode == 0 and "kiln guest agent" in ran.stdout

    monkeypatch.setattr(agent_mod, "_builder", fake_agent("print('two')\n"))
    second = agent_zipapp(tmp_path)
    assert second != first and first.exists()  # old ones are never deleted
    assert sorted(p.name for p in (tmp_path / "agents").iterdir()) == sorted(
        [first.name, second.name]
    )
