"""Build time of a package-list image (``tests/images/data/jq.yaml``): cold and cached.

    .venv/bin/python -m bench images        # outside a network namespace for the cold rows

Rows, all through :func:`kiln.images.build_image` on the shared image cache:

- reference: the ``minimal`` tier, cached (what every sandbox create checks);
- the package-list image, cached (the same check for a user image);
- the fast step: a new reference of a definition whose base is cached (what a
  user's build of an already-built package list costs: initramfs + mkfs);
- cold: a definition nobody built (a unique file makes its base new), so
  mmdebstrap runs. Needs the Debian mirror: inside the bench's network
  namespace these rows are skipped with the reason.

Everything a row builds is removed again (images, registered definitions, new
base trees); the cached test image and ``minimal`` stay.
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from kiln.images import build_image, ensure_image
from kiln.images.cache import default_image_dir, rmtree
from kiln.images.definition import Definition, FileSpec, image_ref, load_yaml_file
from kiln.images.registry import register, tier_of, unregister
from kiln.images.rootfs import host_debian_sources

from ._stats import Row, print_table, print_values

REQUIRES: str | None = "root; the minimal and test images built (scripts/bench does minimal)"
JQ_YAML = Path(__file__).resolve().parents[1] / "tests" / "images" / "data" / "jq.yaml"
CACHED_N = 20
FAST_N = 5
COLD_N = 3


def skip_reason() -> str | None:
    import os  # noqa: PLC0415

    if os.geteuid() != 0:
        return "needs root (mmdebstrap, chroot)"
    return None


def _quiet(_: str) -> None:
    pass


def _timed_build(ref: str, image_dir: Path) -> float:
    t0 = time.perf_counter()
    build_image(ref, image_dir, _quiet)
    return (time.perf_counter() - t0) * 1000


def _mirror_reachable() -> str | None:
    """None if the first Debian mirror answers on TCP, else why not."""
    sources = host_debian_sources("bookworm")
    host = urlparse(sources[0].uri).hostname if sources else "deb.debian.org"
    if not host:
        return None  # a file: mirror
    try:
        with socket.create_connection((host, 80), timeout=3):
            return None
    except OSError as exc:
        return f"the Debian mirror {host} is unreachable here ({exc.strerror or exc})"


def _drop(image_dir: Path, ref: str, definition: Definition, *, base: bool) -> None:
    from kiln.images import prune_images  # noqa: PLC0415

    prune_images(ref, image_dir, keep=0)
    unregister(image_dir, ref)
    if base:
        rmtree(image_dir / "base" / tier_of(definition, ref).base.key())


def main() -> None:
    image_dir = default_image_dir()
    ensure_image("minimal", image_dir, _quiet)
    definition = load_yaml_file(JQ_YAML)
    ref = image_ref(definition, None)
    register(image_dir, ref, definition)
    t0 = time.perf_counter()
    build_image(ref, image_dir, _quiet)  # built before the bench: found, else built now
    first_ms = (time.perf_counter() - t0) * 1000

    rows = [
        Row(
            "reference: minimal tier, cached",
            [_timed_build("minimal", image_dir) for _ in range(CACHED_N)],
        ),
        Row(
            "package-list image, cached",
            [_timed_build(ref, image_dir) for _ in range(CACHED_N)],
            "< 1 s",
        ),
    ]
    fast: list[float] = []
    for _ in range(FAST_N):
        other = f"bench-{secrets.token_hex(4)}.{definition.digest()[:12]}"
        register(image_dir, other, definition)
        try:
            fast.append(_timed_build(other, image_dir))
        finally:
            _drop(image_dir, other, definition, base=False)
    rows.append(Row("package-list, base cached (initramfs + mkfs)", fast, "< 15 s"))

    why_not = _mirror_reachable()
    if why_not is None:
        cold: list[float] = []
        for _ in range(COLD_N):
            unique = Definition(
                name="bench-cold",
                packages=definition.packages,
                files=(FileSpec("/etc/kiln-bench", secrets.token_hex(8)),),
            )
            cold_ref = image_ref(unique, None)
            register(image_dir, cold_ref, unique)
            try:
                cold.append(_timed_build(cold_ref, image_dir))
            finally:
                _drop(image_dir, cold_ref, unique, base=True)
        rows.append(Row("package-list, cold (mmdebstrap + all)", cold, "< 120 s"))
    print_table("image builds (kiln.images.build_image, shared cache)", rows)
    print_values(
        "notes",
        [
            ("test image at bench start", f"{first_ms / 1000:.1f} s", "cached: < 1 s"),
            ("cold rows", "measured" if why_not is None else f"skipped: {why_not}", ""),
        ],
    )
