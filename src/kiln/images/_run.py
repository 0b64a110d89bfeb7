"""Running host commands: the one place that translates subprocess failures."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import StepFailed, ToolMissing

# Which Debian package provides each command we run (for ToolMissing's message).
PACKAGES = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "chroot": "coreutils",
    "cp": "coreutils",
    "lz4": "lz4",
    "zstd": "zstd",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
}


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float,
    input: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion, capturing output; raise an ImageError on failure."""
    args = [str(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            cwd=cwd,
            env=full_env,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ToolMissing(args[0], PACKAGES.get(args[0], args[0])) from exc
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise StepFailed(args, None, stderr) from exc
    if proc.returncode != 0:
        raise StepFailed(args, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc
