"""VM images: building and caching the kernel, initramfs and root disk a sandbox boots.

An :class:`Image` is three read-only files: ``kernel`` (Debian's cloud kernel
as an uncompressed ELF ``vmlinux``), ``initrd`` (busybox + the virtio modules
+ an /init that mounts ``/dev/vda`` and execs the guest agent as PID 1) and
``rootfs`` (a sparse ext4 image of a minimal Debian with python3, the
``sandbox`` user, ``/workspace`` and ``/usr/lib/kiln/agent.pyz``)::

    from kiln.images import ensure_image, kernel_cmdline_defaults
    image = ensure_image("minimal")          # cached after the first ~40 s build
    append = " ".join(kernel_cmdline_defaults())

A tier is one of :data:`TIERS` or a user's package-list definition
(:mod:`kiln.images.definition`: Debian packages, files and env on top of
``minimal``), registered in the cache under a reference
(:mod:`kiln.images.registry`) that every function here accepts as a tier::

    python -m kiln.images ensure --definition tests/images/data/jq.yaml

See :mod:`kiln.images.boot` for the kernel command line and a QEMU argv,
:mod:`kiln.images.initramfs` for what /init does and the kernel parameters
it reads, and :mod:`kiln.images.builder` for the cache keys.

Errors: every exception raised here is an :class:`ImageError`::

    ImageError                 root: anything that stops an image from being built or found
    ├── UnknownTier            no such tier in TIERS (nor a registered definition)
    ├── InvalidDefinition      an image definition that cannot be built as written
    ├── BuildFailed            a build step failed (names the step, keeps the log)
    ├── ToolMissing            a host command is not installed (names the Debian package)
    └── StepFailed             a host command failed (argv, exit status, stderr tail)
"""

from __future__ import annotations

from .boot import kernel_cmdline_defaults
from .builder import (
    BaseTree,
    Image,
    Progress,
    build_image,
    ensure_image,
    find_base,
    find_image,
    list_images,
    prune_images,
)
from .buildlog import BuildFailed
from .cache import default_image_dir
from .definition import Definition, InvalidDefinition
from .errors import ImageError, StepFailed, ToolMissing, UnknownTier
from .tiers import TIERS, Tier

__all__ = [
    "TIERS",
    "BaseTree",
    "BuildFailed",
    "Definition",
    "Image",
    "ImageError",
    "InvalidDefinition",
    "Progress",
    "StepFailed",
    "Tier",
    "ToolMissing",
    "UnknownTier",
    "build_image",
    "default_image_dir",
    "ensure_image",
    "find_base",
    "find_image",
    "kernel_cmdline_defaults",
    "list_images",
    "prune_images",
]
