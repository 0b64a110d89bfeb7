"""Building, finding and listing images: three cached steps keyed by their inputs.

=========  ====================================================  ==================
step       key (sha256 of)                                       cold cost
=========  ====================================================  ==================
base       suite, variant, packages, dpkg options, customize     mmdebstrap, ~30 s
           version, a definition's files (:meth:`BaseSpec.key`)
kernel     kernel .deb file name, module list, extractor         download, ~2 s
           version
image      tier, base key, kernel key, agent zipapp digest,      mkfs + cpio, ~3 s
           /init text, busybox digest, build version, min size
=========  ====================================================  ==================

Changing only the guest agent changes only the image key, so only the fast
step reruns. The current kernel is what apt's lists say the tier's kernel
metapackage depends on; when apt has no lists (offline, cleaned), the newest
cached kernel for that metapackage is used, and only without one does a build
run ``apt-get update``.

A tier is a built-in one (:data:`~kiln.images.tiers.TIERS`) or the reference of
a user's definition (:mod:`kiln.images.registry`): two definitions with the
same packages and files share the slow base step, each has its own image. The
steps are named in the progress and in the build's log
(:mod:`kiln.images.buildlog`); a failing one raises
:class:`~kiln.images.buildlog.BuildFailed`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import agent as agent_mod
from . import cache, initramfs, kernel, rootfs
from .buildlog import BuildLog
from .errors import ImageError
from .initramfs import build_initramfs, host_busybox
from .registry import resolve_tier
from .tiers import Tier

Progress = Callable[[str], None]

# Bump when the fast step (initramfs layout, mkfs options, file names) changes.
BUILD_VERSION = 1
# Bump when the kernel step's extraction changes.
KERNEL_STEP_VERSION = 2

KERNEL_FILE = "vmlinux"
BZIMAGE_FILE = "vmlinuz"  # kept in the kernel cache only
INITRD_FILE = "initramfs.cpio"
ROOTFS_FILE = "rootfs.ext4"
IMAGE_MANIFEST = "image.json"
KERNEL_MANIFEST = "kernel.json"
BASE_MANIFEST = "base.json"
APT_MEMO = "apt-kernel.json"  # what apt resolved, until its lists change
# Images of a tier kept after a build (the newest; every agent change makes one).
KEEP_IMAGES = 3


@dataclass(frozen=True, slots=True)
class Image:
    """A finished image. Its files are read-only; the engine copies ``rootfs`` per sandbox.

    ``size_bytes`` is the size of ``rootfs`` as the guest sees it (a sparse file:
    it occupies less on the host).
    """

    tier: str
    digest: str
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_version: str
    size_bytes: int
    built_at: datetime
    path: Path


def _stderr_progress(message: str) -> None:
    print(f"kiln images: {message}", file=sys.stderr, flush=True)


def _tier(name: str, image_dir: Path) -> Tier:
    """A built-in tier or a registered definition (:mod:`kiln.images.registry`)."""
    return resolve_tier(name, image_dir)


def _sha256(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _tree_size(root: Path) -> tuple[int, int]:
    """Files and bytes (as allocated) under ``root``, symlinks not followed."""
    files = size = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(directory, name)).st_blocks * 512
                files += 1
    return files, size


@contextmanager
def _timed(progress: Progress, done: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    progress(f"{done} ({time.monotonic() - start:.1f} s)")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything an image depends on, resolved without building anything slow."""

    tier: Tier
    base_key: str
    kernel_key: str
    kernel_filename: str
    agent_digest: str
    busybox_digest: str
    init_digest: str

    @property
    def digest(self) -> str:
        return _sha256(
            {
                "tier": self.tier.name,
                "base": self.base_key,
                "kernel": self.kernel_key,
                "agent": self.agent_digest,
                "init": self.init_digest,
                "busybox": self.busybox_digest,
                "min_size": self.tier.min_rootfs_size,
                "build": BUILD_VERSION,
            }
        )


def kernel_key(filename: str, modules: tuple[str, ...]) -> str:
    return _sha256({"deb": filename, "modules": sorted(modules), "version": KERNEL_STEP_VERSION})


def _newest_cached_kernel(image_dir: Path, tier: Tier) -> str | None:
    """The .deb file name of the newest complete kernel entry for ``tier``, if any."""
    parent = image_dir / "kernel"
    if not parent.is_dir():
        return None
    best: tuple[str, str] | None = None
    for entry in parent.iterdir():
        doc = cache.read_manifest(entry / KERNEL_MANIFEST)
        if doc is None or doc.get("metapackage") != tier.kernel_metapackage:
            continue
        filename, built_at = str(doc.get("filename")), str(doc.get("built_at"))
        if entry.name != kernel_key(filename, tier.modules):
            continue  # another module list or extractor version
        if best is None or built_at > best[0]:
            best = (built_at, filename)
    return None if best is None else best[1]


def _kernel_filename(tier: Tier, image_dir: Path, progress: Progress | None) -> str:
    """The kernel .deb that apt selects now (remembered until apt's lists change).

    When apt cannot answer (no lists), the newest cached kernel is used; if
    there is none, a build (``progress`` given) runs ``apt-get update``, and a
    lookup raises :class:`~kiln.images.kernel.AptListsMissing`.
    """
    memo = image_dir / APT_MEMO
    try:
        return kernel.resolve_kernel_package_memo(tier.kernel_metapackage, memo).filename
    except kernel.AptListsMissing:
        cached = _newest_cached_kernel(image_dir, tier)
        if cached is not None:
            return cached
        if progress is None:
            raise
    progress("apt has no package lists: apt-get update…")
    kernel.apt_update()
    return kernel.resolve_kernel_package_memo(tier.kernel_metapackage, memo).filename


def _inputs(tier: Tier, image_dir: Path, progress: Progress | None) -> Inputs:
    filename = _kernel_filename(tier, image_dir, progress)
    return Inputs(
        tier=tier,
        base_key=tier.base.key(),
        kernel_key=kernel_key(filename, tier.modules),
        kernel_filename=filename,
        agent_digest=agent_mod.agent_digest(),
        busybox_digest=hashlib.sha256(host_busybox()).hexdigest(),
        init_digest=hashlib.sha256(initramfs.INIT_SCRIPT.encode()).hexdigest(),
    )


# --------------------------------------------------------------------------- loading


def _image_dir_name(tier: str, digest: str) -> str:
    return f"{tier}-{digest[:16]}"


def load_image(path: Path) -> Image | None:
    """The finished image in ``path`` (its manifest is written last), or None."""
    doc = cache.read_manifest(path / IMAGE_MANIFEST)
    if doc is None:
        return None
    try:
        return Image(
            tier=doc["tier"],
            digest=doc["digest"],
            kernel=path / doc["files"]["kernel"],
            initrd=path / doc["files"]["initrd"],
            rootfs=path / doc["files"]["rootfs"],
            kernel_version=doc["kernel_version"],
            size_bytes=int(doc["size_bytes"]),
            built_at=datetime.fromisoformat(doc["built_at"]),
            path=path,
        )
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class BaseTree:
    """A cached base tree (the slow step): ``root`` is the mmdebstrap'd, customised
    Debian tree, without the guest agent. Read-only by convention: other engines
    copy or archive it, never write into it."""

    tier: str
    key: str
    root: Path


def find_base(tier: str = "minimal", image_dir: Path | None = None) -> BaseTree | None:
    """The cached base tree of ``tier``'s current base spec, or None if it is not built.

    Never builds and needs neither apt nor the kernel: for engines that use the
    tree itself (Docker imports it) rather than the VM image made from it.
    """
    root = image_dir or cache.default_image_dir()
    spec = _tier(tier, root)
    key = spec.base.key()
    path = root / "base" / key
    if cache.read_manifest(path / BASE_MANIFEST) is None:
        return None
    return BaseTree(tier=spec.name, key=key, root=path / "root")


def find_image(tier: str = "minimal", image_dir: Path | None = None) -> Image | None:
    """The cached image built from the *current* inputs of ``tier``, or None.

    Cheap: resolves the kernel from apt's lists and builds the agent zipapp in
    a temporary directory to hash it; never runs mmdebstrap or downloads.
    """
    root = image_dir or cache.default_image_dir()
    inputs = resolve_inputs(tier, root)
    if inputs is None:
        return None
    return load_image(root / "images" / _image_dir_name(tier, inputs.digest))


def resolve_inputs(tier: str = "minimal", image_dir: Path | None = None) -> Inputs | None:
    """The current inputs (and so the digest) of ``tier``, without building anything.

    None when apt has no package lists and no kernel is cached yet.
    """
    try:
        root = image_dir or cache.default_image_dir()
        return _inputs(_tier(tier, root), root, progress=None)
    except kernel.AptListsMissing:
        return None


def list_images(image_dir: Path | None = None) -> list[Image]:
    """Every complete image in the cache (current or not), oldest first."""
    parent = (image_dir or cache.default_image_dir()) / "images"
    if not parent.is_dir():
        return []
    found = [
        image
        for entry in sorted(parent.iterdir())
        if not entry.name.startswith((cache.TMP_PREFIX, cache.OLD_PREFIX))
        and (image := load_image(entry)) is not None
    ]
    return sorted(found, key=lambda i: i.built_at)


def prune_images(tier: str = "minimal", image_dir: Path | None = None, keep: int = 3) -> list[Path]:
    """Delete all but the ``keep`` newest images of ``tier``; return what was removed.

    Engines copy what they boot (the rootfs per sandbox, the kernel and initrd
    next to their snapshots), so an old image is only ever needed to start a
    copy. Builds prune automatically, keeping :data:`KEEP_IMAGES`.
    """
    root = image_dir or cache.default_image_dir()
    with cache.build_lock(root, _stderr_progress):
        return _prune(root, tier, keep, protect=None)


def _prune(image_dir: Path, tier: str, keep: int, protect: Path | None) -> list[Path]:
    """Remove old images of ``tier`` (call with the build lock held)."""
    images = [i for i in list_images(image_dir) if i.tier == tier and i.path != protect]
    doomed = images[: max(0, len(images) - max(keep - (protect is not None), 0))]
    for image in doomed:
        cache.rmtree(image.path)
    return [i.path for i in doomed]


def ensure_image(
    tier: str = "minimal",
    image_dir: Path | None = None,
    progress: Progress | None = None,
) -> Image:
    """The current image of ``tier``: found in the cache, or built now."""
    return find_image(tier, image_dir) or build_image(tier, image_dir, progress)


# --------------------------------------------------------------------------- building


def build_image(
    tier: str = "minimal",
    image_dir: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> Image:
    """Build (or reuse from the cache) the image of ``tier`` from its current inputs.

    ``force`` rebuilds all three steps even if cached. Progress messages go to
    ``progress`` (default: stderr). Concurrent builders serialise on a lock;
    the second one then finds the first one's result in the cache.
    """
    root = image_dir or cache.default_image_dir()
    spec = _tier(tier, root)
    started = time.monotonic()
    with BuildLog.open(root, tier, progress or _stderr_progress) as log:
        with log.step("prepare"), cache.build_lock(root, log):
            for stale in cache.clean_stale(root):
                log(f"removed leftover of an interrupted build: {stale}")
            inputs = _inputs(spec, root, log)
            final = root / "images" / _image_dir_name(tier, inputs.digest)
            if not force and (image := load_image(final)) is not None:
                log(f"cached: {tier} image {image.digest[:16]} ({image.path})")
                log.keep = False
                return image
            with log.step("kernel"):
                kernel_dir = _ensure_kernel(spec, inputs, root, log, force)
            with log.step("base"):
                base_dir = _ensure_base(spec, inputs, root, log, force)
            with log.step("image"):
                image = _build_final(
                    spec, inputs, root, log, kernel_dir=kernel_dir, base_dir=base_dir
                )
            for old in _prune(root, tier, KEEP_IMAGES, protect=image.path):
                log(f"removed old {tier} image {old.name}")
        log(f"built {tier} image {image.digest[:16]} in {time.monotonic() - started:.1f} s")
    return image


def _ensure_kernel(
    tier: Tier, inputs: Inputs, image_dir: Path, report: Progress, force: bool
) -> Path:
    final = image_dir / "kernel" / inputs.kernel_key
    if not force and cache.read_manifest(final / KERNEL_MANIFEST) is not None:
        report(f"cached: kernel {inputs.kernel_filename}")
        return final
    with (
        cache.staging(image_dir, "kernel", inputs.kernel_key[:16]) as tmp,
        _timed(report, "kernel ready"),
    ):
        report(f"downloading kernel package {inputs.kernel_filename}…")
        download = tmp / "download"
        download.mkdir()
        name = inputs.kernel_filename.split("_", 1)[0]
        deb = kernel.download_package(name, download)
        if deb.name != inputs.kernel_filename:
            raise ImageError(f"apt downloaded {deb.name}, expected {inputs.kernel_filename}")
        report("extracting vmlinux and modules…")
        unpacked = tmp / "unpacked"
        kernel.unpack_deb(deb, unpacked)
        release = kernel.kernel_release(unpacked)
        bzimage = kernel.find_bzimage(unpacked, release).read_bytes()
        (tmp / BZIMAGE_FILE).write_bytes(bzimage)
        (tmp / KERNEL_FILE).write_bytes(kernel.extract_vmlinux(bzimage))
        config = unpacked / "boot" / f"config-{release}"
        if config.exists():
            (tmp / "config").write_bytes(config.read_bytes())
        modules, builtin = kernel.collect_modules(unpacked / "lib/modules" / release, tier.modules)
        (tmp / "modules").mkdir()
        names = kernel.module_filenames(modules)
        for filename, module in zip(names, modules, strict=True):
            (tmp / "modules" / filename).write_bytes(module.elf)
        cache.rmtree(download)
        cache.rmtree(unpacked)
        cache.make_read_only(tmp)
        cache.write_manifest(
            tmp / KERNEL_MANIFEST,
            {
                "metapackage": tier.kernel_metapackage,
                "package": name,
                "filename": inputs.kernel_filename,
                "release": release,
                "modules": names,
                "builtin": builtin,
                "built_at": _now(),
            },
        )
        cache.publish(tmp, final)
    return final


def _ensure_base(
    tier: Tier, inputs: Inputs, image_dir: Path, report: Progress, force: bool
) -> Path:
    final = image_dir / "base" / inputs.base_key
    prebuilt = tier.base.prebuilt is not None
    if (not force or prebuilt) and cache.read_manifest(final / BASE_MANIFEST) is not None:
        report(f"cached: {tier.base.suite} base rootfs {inputs.base_key[:16]}")
        return final
    if prebuilt:
        raise ImageError(
            f"the tree of the Dockerfile image {tier.name} is not in the image cache"
            " (dockerd builds it): run `kiln image build` with its Dockerfile again"
        )
    if os.geteuid() != 0:
        raise ImageError("building the base rootfs (mmdebstrap, chroot) needs root")
    with (
        cache.staging(image_dir, "base", inputs.base_key[:16]) as tmp,
        _timed(report, "base rootfs ready"),
    ):
        sources = rootfs.host_debian_sources(tier.base.suite)
        sources_file = None
        if sources:
            sources_file = tmp / "debian.sources"
            sources_file.write_text(rootfs.sources_text(sources))
        where = ", ".join(sorted({s.uri for s in sources})) or "mmdebstrap's default mirror"
        report(f"mmdebstrap {tier.base.suite} {tier.base.variant} from {where} (about 30 s)…")
        rootfs.mmdebstrap(tier.base, tmp / "root", sources_file)
        report("customising the base rootfs…")
        rootfs.customize(tmp / "root")
        if tier.base.files:
            report(f"writing {len(tier.base.files)} file(s) of the definition…")
            rootfs.add_files(tmp / "root", tier.base.files)
        files, size = _tree_size(tmp / "root")
        report(f"base rootfs: {size / (1 << 20):.0f} MiB in {files} files")
        cache.write_manifest(
            tmp / BASE_MANIFEST,
            {
                "suite": tier.base.suite,
                "variant": tier.base.variant,
                "packages": list(tier.base.packages),
                "files": [path for path, _, _ in tier.base.files],
                "customize_version": rootfs.CUSTOMIZE_VERSION,
                "built_at": _now(),
            },
        )
        cache.publish(tmp, final)
    return final


def _build_final(
    tier: Tier,
    inputs: Inputs,
    image_dir: Path,
    report: Progress,
    *,
    kernel_dir: Path,
    base_dir: Path,
) -> Image:
    digest = inputs.digest
    name = _image_dir_name(tier.name, digest)
    kdoc = cache.read_manifest(kernel_dir / KERNEL_MANIFEST)
    if kdoc is None:
        raise ImageError(f"kernel cache entry {kernel_dir} has no manifest")
    with cache.staging(image_dir, "images", name) as tmp, _timed(report, "image ready"):
        report("building the guest agent zipapp…")
        agent_path = agent_mod.build_agent(tmp / "agent.pyz")
        if agent_mod.zipapp_digest(agent_path) != inputs.agent_digest:
            raise ImageError("the guest agent zipapp changed while the image was being built")
        report("writing the initramfs…")
        modules = [(n, (kernel_dir / "modules" / n).read_bytes()) for n in kdoc["modules"]]
        (tmp / INITRD_FILE).write_bytes(build_initramfs(host_busybox(), modules))
        _link_or_copy(kernel_dir / KERNEL_FILE, tmp / KERNEL_FILE)
        uuid = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        size = rootfs.make_ext4(
            base_dir / "root",
            agent_path,
            tmp / ROOTFS_FILE,
            tmp / ".staging",
            uuid=uuid,
            min_size=tier.min_rootfs_size,
            progress=report,
        )
        agent_path.unlink()
        cache.make_read_only(tmp)
        cache.write_manifest(
            tmp / IMAGE_MANIFEST,
            {
                "tier": tier.name,
                "digest": digest,
                "kernel_version": kdoc["release"],
                "size_bytes": size,
                "built_at": _now(),
                "files": {"kernel": KERNEL_FILE, "initrd": INITRD_FILE, "rootfs": ROOTFS_FILE},
                "inputs": {
                    "base": inputs.base_key,
                    "kernel": inputs.kernel_key,
                    "kernel_deb": inputs.kernel_filename,
                    "agent": inputs.agent_digest,
                    "busybox": inputs.busybox_digest,
                    "build": BUILD_VERSION,
                },
            },
        )
        final = image_dir / "images" / name
        cache.publish(tmp, final)
    image = load_image(final)
    if image is None:
        raise ImageError(f"published image {final} cannot be read back")
    return image


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        dst.write_bytes(src.read_bytes())
