"""The guest agent zipapp that the rootfs runs as PID 1 (``/usr/lib/kiln/agent.pyz``).

The zipapp itself is built by :func:`kiln.guest.build.build_zipapp`; this module
only calls it and fingerprints the result. The fingerprint hashes the archive's
*contents* (member names and bytes, plus the shebang), not the zip file, so
timestamps inside the archive cannot change an image's digest.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from kiln.guest.build import build_zipapp

from .errors import ImageError


def _builder() -> Callable[[Path], Path]:
    """The zipapp builder (a seam for tests, which swap in a different agent)."""
    return build_zipapp


def build_agent(dest: Path) -> Path:
    """Build the guest agent zipapp at ``dest``; return its path."""
    try:
        return _builder()(dest)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"building the guest agent zipapp failed: {exc}") from exc


#: A .pyc's header: magic (the Python version), flags and the hash of its source.
PYC_HEADER = 16


def zipapp_digest(path: Path) -> str:
    """sha256 over the zipapp's prefix (shebang) and sorted (name, content) members.

    Of a ``.pyc`` only its header counts (Python version and source hash): the
    marshalled code after it is not reproducible. marshal marks objects that are
    referenced more than once, so the bytes depend on reference counts, and a
    thread compiling the same sources at the same time (the Docker engine building
    its agent while the daemon checks its image) changes them. Hashing them made
    the image's digest differ from one daemon start to the next, and every start
    rebuilt the QEMU template.
    """
    h = hashlib.sha256()
    data = path.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            infos = sorted(zf.infolist(), key=lambda i: i.filename)
            first = min((i.header_offset for i in infos), default=len(data))
            h.update(b"prefix\0" + data[:first])
            for info in infos:
                content = zf.read(info)
                if info.filename.endswith(".pyc"):
                    content = content[:PYC_HEADER]
                h.update(b"%s\0%d\0" % (info.filename.encode(), len(content)))
                h.update(content)
    except zipfile.BadZipFile as exc:
        raise ImageError(f"{path} is not a zipapp: {exc}") from exc
    return h.hexdigest()


def agent_digest() -> str:
    """Build the agent into a temporary directory and return its :func:`zipapp_digest`."""
    with tempfile.TemporaryDirectory(prefix="kiln-agent-") as tmp:
        return zipapp_digest(build_agent(Path(tmp) / "agent.pyz"))
