"""Engine-wide setup, done once on first use rather than in a constructor:
directories, the sandbox network, the accelerator and TSC frequency; and the
images sandboxes boot from, pinned so that the image cache can change under us.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from pathlib import Path

from kiln.images import Image, ImageError, UnknownTier
from kiln.images.child import ensure_image_in_child
from kiln.network import Network, NetworkError

from ..errors import EngineUnavailable, ImageNotFound
from .accel import Accel, AccelDecision, decide_accel, host_facts, probe_boot
from .argv import build_probe_argv, host_tsc_khz
from .config import QemuConfig

log = logging.getLogger(__name__)


class Host:
    """What every sandbox of the engine shares. :meth:`ensure_ready` before use."""

    def __init__(self, config: QemuConfig, network: Network) -> None:
        self.config = config
        self._network = network
        self._ready = False
        self._ready_lock = asyncio.Lock()
        #: None until the first :meth:`ensure_ready`.
        self.accel: AccelDecision | None = None
        self.tsc_khz: int | None = None
        #: Set by the engine's close: no setup after that.
        self.closed = False
        self._images: dict[str, Image] = {}
        self._image_lock = asyncio.Lock()

    async def ensure_ready(self, image: Image | None) -> None:
        """Set up the host once; with ``image``, also settle an accelerator that
        needs a trial boot (which needs a kernel)."""
        if self._ready and (self.accel is not None and not self.accel.needs_probe):
            return
        async with self._ready_lock:
            if self.closed:
                raise EngineUnavailable("the QEMU engine is closed")
            if not self._ready:
                if shutil.which(self.config.qemu_binary) is None:
                    raise EngineUnavailable(f"{self.config.qemu_binary} is not installed")
                for d in (
                    self.config.sandboxes_dir,
                    self.config.bases_dir,
                    self.config.effective_volumes_dir,
                ):
                    d.mkdir(parents=True, exist_ok=True)
                try:
                    await asyncio.to_thread(self._network.setup)
                except NetworkError as exc:
                    raise EngineUnavailable(f"sandbox network setup failed: {exc}") from exc
                self.tsc_khz = host_tsc_khz()
                facts = await asyncio.to_thread(host_facts)
                self.accel = decide_accel(self.config.accel, facts)
                self._ready = True
            if self.accel is not None and self.accel.needs_probe and image is not None:
                ok, detail = await self._probe_kvm(image.kernel)
                facts = await asyncio.to_thread(host_facts)
                self.accel = decide_accel(self.config.accel, facts, probe_ok=ok)
                log.info("accelerator: %s (%s: %s)", self.accel.accel, self.accel.reason, detail)

    async def _probe_kvm(self, kernel: Path) -> tuple[bool, str]:
        probe_dir = self.config.data_dir / "accel-probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        console = probe_dir / "console.log"
        console.unlink(missing_ok=True)
        argv = build_probe_argv(self.config.qemu_binary, kernel, Accel.KVM, console, self.tsc_khz)
        return await probe_boot(argv, console)

    async def image(self, tier: str) -> Image:
        async with self._image_lock:
            image = self._images.get(tier)
            if image is not None and image.kernel.exists():
                return image
            try:
                # A build runs in a child process, stopped if this is cancelled.
                image = await ensure_image_in_child(tier, self.config.image_dir)
            except UnknownTier as exc:
                raise ImageNotFound(str(exc)) from exc
            except ImageError as exc:
                raise ImageNotFound(f"image {tier!r} is not available: {exc}") from exc
            self._images[tier] = image
            return image

    def pin_image(self, image: Image) -> tuple[Path, Path, Path]:
        """Hard-link (or copy) the image files under data_dir/bases/<digest>.

        Root-disk overlays and cold snapshots refer to these paths, so a rebuilt or
        pruned image cache never pulls the floor from under a sandbox.
        """
        base = self.config.bases_dir / image.digest[:16]
        files = (
            (image.kernel, base / "vmlinux"),
            (image.initrd, base / "initramfs.cpio"),
            (image.rootfs, base / "rootfs.ext4"),
        )
        if all(dst.exists() for _, dst in files):
            return files[0][1], files[1][1], files[2][1]
        tmp = base.with_name(f".{base.name}.{secrets.token_hex(4)}")
        tmp.mkdir(parents=True)
        try:
            for src, dst in files:
                try:
                    os.link(src, tmp / dst.name)
                except OSError:  # another filesystem: a private read-only copy
                    shutil.copyfile(src, tmp / dst.name)
                    os.chmod(tmp / dst.name, 0o444)
            try:
                tmp.rename(base)
            except OSError:
                if not base.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return files[0][1], files[1][1], files[2][1]
