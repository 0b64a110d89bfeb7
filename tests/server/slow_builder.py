"""A stand-in for ``python -m kiln.images ensure --json`` that takes as long as a test wants.

``KILN_IMAGE_BUILDER="python tests/server/slow_builder.py"`` makes the daemon run
this instead of the real builder, through the same child-process path. It speaks
the real builder's protocol (progress on stderr, the image as JSON on stdout) and
uses the real image cache: the build lock, the removal of what an interrupted
build left, a ``.tmp-*`` staging directory and publication by rename once the
manifest is written. It only fakes the slow part: it writes placeholder files
while ``sleep`` runs, as a grandchild in its process group that ignores SIGTERM
(as mmdebstrap does in some of its steps), for ``SLOW_BUILD_S`` seconds.
Its progress names its process group and the sleeper, for the test to check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from kiln.images import cache
from kiln.images.builder import IMAGE_MANIFEST, load_image

DIGEST = "5" * 64


def say(message: str) -> None:
    print(f"kiln images: {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("ensure",))
    parser.add_argument("--tier", default="minimal")
    parser.add_argument("--image-dir", type=Path, required=True)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root: Path = args.image_dir
    final = root / "images" / f"{args.tier}-{DIGEST[:16]}"
    with cache.build_lock(root, say):
        for stale in cache.clean_stale(root):
            say(f"removed leftover of an interrupted build: {stale}")
        image = load_image(final)
        if image is None:
            tmp = cache.temp_dir(root, "images", final.name)
            for name in ("vmlinux", "initramfs.cpio", "rootfs.ext4"):
                (tmp / name).write_bytes(b"placeholder\n")
            sleeper = subprocess.Popen(
                ["sh", "-c", f'trap "" TERM; exec sleep {float(os.environ["SLOW_BUILD_S"])}']
            )
            say(f"building in process group {os.getpgrp()}, sleeper {sleeper.pid}")
            sleeper.wait()
            doc = {
                "tier": args.tier,
                "digest": DIGEST,
                "kernel_version": "0-test",
                "size_bytes": 12,
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": {"kernel": "vmlinux", "initrd": "initramfs.cpio", "rootfs": "rootfs.ext4"},
            }
            cache.write_manifest(tmp / IMAGE_MANIFEST, doc)
            cache.publish(tmp, final)
            say(f"built {args.tier} image {DIGEST[:16]}")
            image = load_image(final)
            assert image is not None
    print(json.dumps({"path": str(image.path), "digest": image.digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
