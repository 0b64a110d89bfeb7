"""The guest kernel: Debian's cloud kernel, unpacked to an ELF ``vmlinux`` plus modules.

QEMU's microvm boots the uncompressed ELF directly (it carries a PVH note),
which is faster than letting the bzImage decompress itself. The bzImage's
setup header says where the compressed kernel is: the protected-mode code
starts after ``setup_sects + 1`` sectors, and ``payload_offset`` /
``payload_length`` locate the compressed ``vmlinux`` inside it. Debian
compresses it with LZ4 (legacy frame format, followed by the 4-byte
little-endian uncompressed size that the kernel's build appends).

virtio is modular in this kernel, so the initramfs loads the modules listed in
the tier; their load order comes from the ``depends=`` field of each module's
``.modinfo`` section (there is no modules.dep in the package).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import lzma
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._run import run
from .errors import ImageError, StepFailed, ToolMissing

SETUP_HEADER_MAGIC = b"HdrS"
ELF_MAGIC = b"\x7fELF"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_APT_TIMEOUT = 300.0


# --------------------------------------------------------------------------- bzImage


def bzimage_payload(bzimage: bytes) -> bytes:
    """Return the compressed kernel stored in a bzImage (boot protocol ≥ 2.08)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != SETUP_HEADER_MAGIC:
        raise ImageError("not a bzImage: no 'HdrS' setup header at 0x202")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise ImageError(f"bzImage boot protocol {version:#x} has no payload fields (< 2.08)")
    setup_sects = bzimage[0x1F1] or 4  # 0 means 4, for ancient kernels
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        raise ImageError("bzImage payload lies outside the file")
    return payload


def decompress_payload(payload: bytes, lz4: Callable[[bytes], bytes] | None = None) -> bytes:
    """Decompress a bzImage payload (LZ4, gzip, xz or zstd) into the ELF ``vmlinux``."""
    # The kernel's build appends the uncompressed size (u32 LE) to the payload.
    (expected_size,) = struct.unpack("<I", payload[-4:])
    body = payload[:-4]
    if body.startswith(LZ4_LEGACY_MAGIC):
        elf = (lz4 or _lz4_cli)(body)
    elif body.startswith(GZIP_MAGIC):
        elf = gzip.decompress(body)
    elif body.startswith(XZ_MAGIC):
        elf = lzma.LZMADecompressor().decompress(body)
    elif body.startswith(ZSTD_MAGIC):
        elf = run(["zstd", "-dc"], input=body, timeout=120).stdout
    else:
        raise ImageError(f"unknown bzImage payload compression (magic {body[:6].hex()})")
    if not elf.startswith(ELF_MAGIC):
        raise ImageError("decompressed kernel is not an ELF file")
    if len(elf) & 0xFFFFFFFF != expected_size:
        raise ImageError(
            f"decompressed kernel is {len(elf)} bytes, the bzImage says {expected_size}"
        )
    return elf


def _lz4_cli(data: bytes) -> bytes:
    return run(["lz4", "-dc"], input=data, timeout=120).stdout


def extract_vmlinux(bzimage: bytes) -> bytes:
    """bzImage bytes → uncompressed ELF ``vmlinux`` bytes."""
    return decompress_payload(bzimage_payload(bzimage))


# --------------------------------------------------------------------------- apt


@dataclass(frozen=True, slots=True)
class KernelPackage:
    name: str  # linux-image-6.1.0-56-cloud-amd64
    filename: str  # linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb
    uri: str
    sha256: str


class AptListsMissing(ImageError):
    """apt has no package lists (``apt-get update`` has not run)."""


def resolve_kernel_package(metapackage: str) -> KernelPackage:
    """Ask apt (offline, from its lists) which versioned kernel the metapackage selects."""
    try:
        out = run(["apt-cache", "depends", "--important", metapackage], timeout=60)
    except (StepFailed, ToolMissing) as exc:
        raise AptListsMissing(f"apt cannot resolve {metapackage}: {exc}") from exc
    deps = re.findall(r"^\s*Depends:\s*(linux-image-\S+)", out.stdout.decode(), re.M)
    if not deps:
        raise AptListsMissing(f"{metapackage} depends on no linux-image package")
    name = deps[0]
    uris = run(["apt-get", "download", "--print-uris", name], timeout=60).stdout.decode()
    m = re.search(r"^'(\S+)' (\S+\.deb) \d+ (?:SHA256:([0-9a-f]{64}))?", uris, re.M)
    if not m:
        raise ImageError(f"apt-get download --print-uris {name} gave no .deb: {uris!r}")
    return KernelPackage(name, m.group(2), m.group(1), m.group(3) or "")


APT_STATE_PATHS = (
    Path("/var/lib/apt/lists"),
    Path("/etc/apt/sources.list"),
    Path("/etc/apt/sources.list.d"),
    Path("/etc/apt/preferences"),
    Path("/etc/apt/preferences.d"),
)


def apt_state_fingerprint(paths: Sequence[Path] = APT_STATE_PATHS) -> str:
    """Changes whenever apt's answer may change (``apt-get update``, sources, pinning)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(root.iterdir()) if root.is_dir() else [root]
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_kernel_package_memo(
    metapackage: str, memo: Path, state_paths: Sequence[Path] = APT_STATE_PATHS
) -> KernelPackage:
    """:func:`resolve_kernel_package`, remembered in ``memo`` until apt's state changes.

    Asking apt costs about a second on hosts without apt's binary cache; the
    answer only changes after ``apt-get update`` (or a sources/pinning change).
    """
    key = f"{metapackage}:{apt_state_fingerprint(state_paths)}"
    try:
        doc = json.loads(memo.read_text())
        if doc.get("key") == key:
            return KernelPackage(**doc["package"])
    except (OSError, ValueError, TypeError, KeyError):
        pass
    pkg = resolve_kernel_package(metapackage)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "package": dataclasses.asdict(pkg)}))
        os.replace(tmp, memo)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache dir only costs speed
    return pkg


def apt_update() -> None:
    run(["apt-get", "update", "-qq"], timeout=_APT_TIMEOUT)


def download_package(name: str, dest_dir: Path) -> Path:
    """``apt-get download`` into ``dest_dir`` (which must be empty); return the .deb."""
    # As root, apt drops to the _apt user, who cannot write to our private temp dir.
    run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", name],
        cwd=dest_dir,
        timeout=_APT_TIMEOUT,
    )
    debs = sorted(dest_dir.glob("*.deb"))
    if len(debs) != 1:
        raise ImageError(f"apt-get download {name} produced {len(debs)} .deb files")
    return debs[0]


def unpack_deb(deb: Path, dest: Path) -> None:
    run(["dpkg-deb", "-x", deb, dest], timeout=120)


# --------------------------------------------------------------------------- modules


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a kernel module's ``.modinfo`` ELF section."""
    if ko[:4] != ELF_MAGIC or ko[4] != 2:
        raise ImageError("kernel module is not a 64-bit ELF file")
    e_shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = e_shoff + i * e_shentsize
        name_off = struct.unpack_from("<I", ko, base)[0]
        offset, size = struct.unpack_from("<QQ", ko, base + 0x18)
        return name_off, offset, size

    _, str_off, _ = section(e_shstrndx)
    for i in range(e_shnum):
        name_off, offset, size = section(i)
        end = ko.index(b"\0", str_off + name_off)
        if ko[str_off + name_off : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in ko[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    raise ImageError("kernel module has no .modinfo section")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    return _norm(path.name.split(".ko", 1)[0])


def builtin_modules(moddir: Path) -> set[str]:
    """Names of the modules compiled into the kernel (``modules.builtin``)."""
    listing = moddir / "modules.builtin"
    if not listing.exists():
        return set()
    return {_module_name(Path(line)) for line in listing.read_text().split() if line}


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz``."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return run(["zstd", "-dc"], input=data, timeout=60).stdout
    return data


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    elf: bytes
    depends: tuple[str, ...]


def collect_modules(moddir: Path, wanted: Iterable[str]) -> tuple[list[Module], list[str]]:
    """Find ``wanted`` (plus their dependencies) under ``moddir``, in load order.

    Returns ``(modules, builtin)``: the loadable modules, each after everything
    it depends on, and the wanted names that are built into the kernel.
    """
    builtin = builtin_modules(moddir)
    files: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        files.setdefault(_module_name(path), path)

    loaded: dict[str, Module] = {}
    order: list[Module] = []
    skipped: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name in loaded:
            return
        if name in builtin:
            if name not in skipped:
                skipped.append(name)
            return
        if name not in files:
            raise ImageError(f"kernel module {name!r} not found under {moddir}")
        elf = read_module(files[name])
        deps = tuple(_norm(d) for d in modinfo(elf).get("depends", "").split(",") if d)
        for dep in deps:
            visit(dep, (*chain, name))
        module = Module(name, elf, deps)
        loaded[name] = module
        order.append(module)

    for name in wanted:
        visit(_norm(name), ())
    return order, skipped


def kernel_release(root: Path) -> str:
    """The single ``lib/modules/<release>`` directory of an unpacked kernel package."""
    releases = sorted(p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise ImageError(f"expected one kernel release in the package, found {releases}")
    return releases[0]


def find_bzimage(root: Path, release: str) -> Path:
    path = root / "boot" / f"vmlinuz-{release}"
    if not path.exists():
        raise ImageError(f"kernel package has no boot/vmlinuz-{release}")
    return path


def module_filenames(modules: Sequence[Module]) -> list[str]:
    """Initramfs file names that sort in load order: ``01-virtio.ko`` ..."""
    return [f"{i:02d}-{m.name}.ko" for i, m in enumerate(modules, start=1)]
