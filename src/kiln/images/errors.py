"""Errors raised by :mod:`kiln.images`.

::

    ImageError                 root: anything that stops an image from being built or found
    ├── UnknownTier            no such tier in TIERS (nor a registered definition)
    ├── InvalidDefinition      (definition.py) a definition that cannot be built as written
    ├── BuildFailed            (builder.py) a build step failed (names the step, keeps the log)
    ├── ToolMissing            a host command is not installed (names the Debian package)
    └── StepFailed             a host command failed (argv, exit status, stderr tail)
"""

from __future__ import annotations

from collections.abc import Sequence


class ImageError(Exception):
    """Root of every error raised by :mod:`kiln.images`."""


class UnknownTier(ImageError):
    def __init__(self, tier: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown image tier {tier!r} (known: {', '.join(known)})")
        self.tier = tier


class ToolMissing(ImageError):
    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"{tool!r} is not installed; install the Debian package {package!r} "
            "(scripts/bootstrap does this)"
        )
        self.tool = tool
        self.package = package


class StepFailed(ImageError):
    """A build command exited with an error (or timed out)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        status = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{argv[0]} {status}: {' '.join(argv)}\n{tail}".rstrip())
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
