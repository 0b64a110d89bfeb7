"""Image tiers: what goes into each kind of image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .rootfs import DEFAULT_MIN_SIZE, BaseSpec

VIRTIO_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
)


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    base: BaseSpec
    kernel_metapackage: str
    modules: tuple[str, ...]
    min_rootfs_size: int = DEFAULT_MIN_SIZE


TIERS: Mapping[str, Tier] = MappingProxyType(
    {
        "minimal": Tier(
            name="minimal",
            base=BaseSpec(
                suite="bookworm",
                variant="minbase",
                packages=(
                    "python3",
                    "iproute2",
                    "procps",
                    "ca-certificates",
                    "bash",
                    "coreutils",
                    "less",
                    "git",
                    "curl",
                    # Agents install what they need: root via sudo, Python
                    # packages into a venv (pip's Recommends, a compiler and
                    # headers, stay out; mmdebstrap never installs Recommends).
                    "sudo",
                    "python3-pip",
                    "python3-venv",
                ),
            ),
            kernel_metapackage="linux-image-cloud-amd64",
            modules=VIRTIO_MODULES,
        ),
    }
)
