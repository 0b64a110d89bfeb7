"""``python -m kiln.images``: build, find and list images from a shell.

Used by scripts that must build the image *before* entering a network namespace
(the build downloads Debian packages; tests then run offline)::

    python -m kiln.images ensure [--tier minimal] [--image-dir DIR] [--json]
    python -m kiln.images ensure --definition FILE.yaml   # a global image of a definition
    python -m kiln.images build [--force]
    python -m kiln.images find | list | cmdline
    python -m kiln.images prune [--keep 3]

``--json`` prints the image as one JSON object instead of a line of text: the
daemon runs ``ensure --json`` as a child process it can stop
(:mod:`kiln.images.child`) and reads the image's directory from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import (
    Image,
    ImageError,
    build_image,
    ensure_image,
    find_image,
    kernel_cmdline_defaults,
    list_images,
    prune_images,
)
from .cache import default_image_dir
from .definition import image_ref, load_yaml_file
from .registry import register


def format_image(image: Image) -> str:
    return (
        f"{image.tier}\t{image.digest[:16]}\t{image.kernel_version}\t"
        f"{image.size_bytes >> 20} MiB\t{image.built_at:%Y-%m-%d %H:%M}\t{image.path}"
    )


def image_json(image: Image) -> str:
    return json.dumps(
        {
            "tier": image.tier,
            "digest": image.digest,
            "path": str(image.path),
            "kernel_version": image.kernel_version,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln.images", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=("ensure", "build", "find", "list", "cmdline", "prune"))
    parser.add_argument(
        "--tier", default="minimal", help="a built-in tier or a registered image reference"
    )
    parser.add_argument(
        "--definition",
        type=Path,
        default=None,
        help="ensure, build: register this YAML definition as a global image and use it",
    )
    parser.add_argument("--image-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="build: rebuild every step")
    parser.add_argument("--keep", type=int, default=3, help="prune: images of the tier to keep")
    parser.add_argument("--json", action="store_true", help="ensure, build: print JSON")
    args = parser.parse_args(argv)
    try:
        if args.definition is not None:
            definition = load_yaml_file(args.definition)
            args.tier = image_ref(definition, None)
            register(args.image_dir or default_image_dir(), args.tier, definition)
        if args.command == "cmdline":
            print(" ".join(kernel_cmdline_defaults()))
        elif args.command == "prune":
            for path in prune_images(args.tier, args.image_dir, keep=args.keep):
                print(f"removed {path}")
        elif args.command == "list":
            for image in list_images(args.image_dir):
                print(format_image(image))
        elif args.command == "find":
            found = find_image(args.tier, args.image_dir)
            if found is None:
                print(f"no current {args.tier} image", file=sys.stderr)
                return 1
            print(format_image(found))
        else:
            if args.command == "build":
                image = build_image(args.tier, args.image_dir, force=args.force)
            else:
                image = ensure_image(args.tier, args.image_dir)
            print(image_json(image) if args.json else format_image(image))
    except ImageError as exc:
        print(f"kiln images: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
