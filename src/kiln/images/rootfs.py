"""The root filesystem: an mmdebstrap'd Debian base (slow, cached) → ext4 image (fast).

The base step runs ``mmdebstrap`` from the host's Debian apt sources and then
customises the tree (the ``sandbox`` user, /workspace, hostname, ...). It
takes tens of seconds and is cached as a plain directory; everything that
changes it is in :meth:`BaseSpec.key`.

The fast step hard-links the cached tree into a staging directory (``cp -al``:
instant, and only *new* files are added to it, never written through a link),
adds the agent zipapp, and runs ``mkfs.ext4 -d`` (no mount, no loop device).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.protocol import SANDBOX_UID, SANDBOX_USER

from ._run import run
from .errors import ImageError

# Bump when customize() or the mmdebstrap options change what the base contains.
CUSTOMIZE_VERSION = 2

HOSTNAME = "kiln"
SUDOERS_FILE = "/etc/sudoers.d/kiln-sandbox"
LABEL = "kiln-root"
MiB = 1 << 20
GiB = 1 << 30
DEFAULT_MIN_SIZE = 1 * GiB
# Fixed filesystem timestamps (superblock, journal) so mkfs output depends on inputs only.
FAKE_TIME = 1_700_000_000

_DPKG_OPTS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

_MMDEBSTRAP_TIMEOUT = 1800.0


@dataclass(frozen=True, slots=True)
class BaseSpec:
    suite: str
    variant: str
    packages: tuple[str, ...]
    #: (absolute path, text, mode) written into the tree after customize(), owned by root.
    files: tuple[tuple[str, str, int], ...] = ()
    #: The key of a tree made elsewhere (a Dockerfile image's, exported from dockerd):
    #: it is the cache key, and the base step never runs mmdebstrap for it.
    prebuilt: str | None = None

    def key(self) -> str:
        if self.prebuilt is not None:
            return self.prebuilt
        doc: dict[str, object] = {
            "suite": self.suite,
            "variant": self.variant,
            "packages": sorted(self.packages),
            "dpkg": list(_DPKG_OPTS),
            "customize": CUSTOMIZE_VERSION,
        }
        if self.files:  # absent when empty: the built-in tiers keep their cached bases
            doc["files"] = [list(f) for f in sorted(self.files)]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    signed_by: str | None


def _suite_family(suite: str) -> set[str]:
    return {suite, f"{suite}-updates", f"{suite}-security", f"{suite}/updates"}


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields:
            yield fields


def _is_debian(signed_by: str | None, uri: str) -> bool:
    if signed_by is None:
        return True  # a plain (local) mirror: trusted with apt's default keyrings
    return "debian-archive" in signed_by or "debian.org" in uri


def host_debian_sources(suite: str, etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """The host's enabled Debian ``main`` sources for ``suite`` (and -updates, -security).

    Third-party repositories (other suites, other components, other keyrings)
    are dropped: the image must be built from Debian packages only.
    """
    family = _suite_family(suite)
    found: list[AptSource] = []
    files = sorted((etc_apt / "sources.list.d").glob("*.sources"))
    for path in files:
        for st in _deb822_stanzas(path.read_text(errors="replace")):
            if "deb" not in st.get("types", "").split() or st.get("enabled") == "no":
                continue
            suites = tuple(s for s in st.get("suites", "").split() if s in family)
            if not suites or "main" not in st.get("components", "").split():
                continue
            signed = st.get("signed-by")
            for uri in st.get("uris", "").split():
                if _is_debian(signed, uri):
                    found.append(AptSource(uri, suites, signed))
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
            if not m or m.group(3) not in family or "main" not in m.group(4).split():
                continue
            opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
            signed = opts.get("signed-by")
            if _is_debian(signed, m.group(2)):
                found.append(AptSource(m.group(2), (m.group(3),), signed))
    return found


def sources_text(sources: list[AptSource]) -> str:
    """deb822 text for mmdebstrap (components: main only)."""
    stanzas = []
    for src in sources:
        lines = ["Types: deb", f"URIs: {src.uri}", f"Suites: {' '.join(src.suites)}"]
        lines.append("Components: main")
        if src.signed_by and "\n" not in src.signed_by:
            lines.append(f"Signed-By: {src.signed_by}")
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)


# --------------------------------------------------------------------------- base


def mmdebstrap(spec: BaseSpec, root: Path, sources_file: Path | None) -> None:
    """Bootstrap ``spec`` into the (not yet existing) directory ``root``."""
    argv: list[str | Path] = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        f"--variant={spec.variant}",
        f"--include={','.join(spec.packages)}",
        '--aptopt=Acquire::Retries "3"',
        *(f"--dpkgopt={opt}" for opt in _DPKG_OPTS),
        spec.suite,
        root,
    ]
    if sources_file is not None:
        argv.append(sources_file)
    run(argv, timeout=_MMDEBSTRAP_TIMEOUT)


def customize(root: Path) -> None:
    """Turn a bootstrapped tree into a kiln sandbox root (changes bump CUSTOMIZE_VERSION)."""
    uid = str(SANDBOX_UID)
    run(["chroot", root, "groupadd", "--gid", uid, SANDBOX_USER], timeout=60)
    run(
        [
            "chroot",
            root,
            "useradd",
            "--uid",
            uid,
            "--gid",
            uid,
            "--create-home",
            "--home-dir",
            f"/home/{SANDBOX_USER}",
            "--shell",
            "/bin/bash",
            SANDBOX_USER,
        ],
        timeout=60,
    )
    workspace = root / "workspace"
    workspace.mkdir(mode=0o755)
    os.chown(workspace, SANDBOX_UID, SANDBOX_UID)
    (root / "usr/lib/kiln").mkdir(mode=0o755, parents=True)
    _write(root / "etc/hostname", f"{HOSTNAME}\n")
    _write(
        root / "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
    # mmdebstrap copied the build host's resolver config in; the agent writes the real one.
    _write(root / "etc/resolv.conf", "# written by the kiln guest agent at boot\n")
    _write(root / "etc/machine-id", "")
    if (root / "etc/sudoers.d").is_dir():
        allow_sudo(root)


def allow_sudo(root: Path) -> None:
    """Passwordless sudo for the sandbox user (the VM, not its users, is the boundary).

    sudo ignores a sudoers.d file that is writable by anyone but root, and one
    with a syntax error breaks sudo for everybody: 0440, and checked by visudo
    where the image has it.
    """
    path = root / SUDOERS_FILE.lstrip("/")
    _write(path, f"{SANDBOX_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n", mode=0o440)
    if (root / "usr/sbin/visudo").exists():
        run(["chroot", root, "/usr/sbin/visudo", "-cf", SUDOERS_FILE], timeout=60)


def add_files(root: Path, files: tuple[tuple[str, str, int], ...]) -> None:
    """Write a definition's files into the tree, owned by root; parents are made 0755.

    A directory symlink on the way (``/bin -> usr/bin`` in a merged-/usr tree)
    is followed inside the tree only; the file itself replaces a symlink.
    """
    for path, text, mode in files:
        parent = root
        for part in Path(path).parent.parts[1:]:
            parent = parent / part
            if parent.is_symlink():
                parent = _link_in_tree(root, parent, path)
            elif not parent.exists():
                parent.mkdir(mode=0o755)
            if not parent.is_dir():
                where = parent.relative_to(root)
                raise ImageError(f"cannot write {path}: /{where} is not a directory")
        target = parent / Path(path).name
        if target.is_dir() and not target.is_symlink():
            raise ImageError(f"cannot write {path}: it is a directory in the image")
        _write(target, text, mode=mode)  # the build runs as root: root owns it


def _link_in_tree(root: Path, link: Path, path: str) -> Path:
    target = os.readlink(link)
    start = root if target.startswith("/") else link.parent
    resolved = Path(os.path.normpath(start / target.lstrip("/")))
    if resolved != root and root not in resolved.parents:
        raise ImageError(f"cannot write {path}: /{link.relative_to(root)} points out of the tree")
    return resolved


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


# --------------------------------------------------------------------------- ext4


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, inode count) of a directory tree, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            total += st.st_blocks * 512
    return total, len(seen) + 1


def ext4_size(used: int, min_size: int = DEFAULT_MIN_SIZE) -> int:
    """Image size: the used bytes plus 25 % and 256 MiB of headroom, at least ``min_size``."""
    want = max(min_size, int(used * 1.25) + 256 * MiB)
    return -(-want // (4 * MiB)) * (4 * MiB)


def make_ext4(
    base_root: Path,
    agent: Path,
    out: Path,
    staging: Path,
    *,
    uuid: str,
    min_size: int = DEFAULT_MIN_SIZE,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Write ``out`` (sparse ext4) from ``base_root`` + the agent; return its size in bytes."""
    run(["cp", "-al", base_root, staging], timeout=300)
    try:
        target = staging / "usr/lib/kiln/agent.pyz"
        if target.exists():
            raise ImageError(f"base tree already contains {target.relative_to(staging)}")
        shutil.copyfile(agent, target)  # a new inode: the cached base is untouched
        target.chmod(0o644)
        used, _ = tree_usage(staging)
        size = ext4_size(used, min_size)
        if progress:
            progress(f"mkfs.ext4 ({used // MiB} MiB used, {size // MiB} MiB image)…")
        run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                LABEL,
                "-U",
                uuid,
                "-m",
                "0",
                "-E",
                f"lazy_itable_init=0,lazy_journal_init=0,hash_seed={uuid}",
                "-d",
                staging,
                out,
                f"{size // 1024}k",
            ],
            env={"E2FSPROGS_FAKE_TIME": str(FAKE_TIME)},
            timeout=600,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return size
