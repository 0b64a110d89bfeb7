"""The Docker engine's images: kiln's cached Debian base tree, imported into dockerd once.

    ensure_image(client, tier)    "kiln/<tier>:<base key16>", imported on first use (~10 s),
                                  found by its labels afterwards (~ms)
    image_exists(client, tier)    is the current image of ``tier`` there? (never imports)
    agent_zipapp(state_dir)       the guest agent zipapp, to bind-mount read-only at AGENT_PATH

The image is the base tree of :func:`kiln.images.find_base` (mmdebstrap'd and
customised, the same tree the VM image is made from) and nothing else. The
guest agent is *not* in it: the engine bind-mounts :func:`agent_zipapp` at
:data:`AGENT_PATH`, so changing the agent never re-imports 300 MB. kiln never
runs mmdebstrap here; without a base tree :func:`ensure_image` says to run
``python -m kiln.images ensure`` (which needs the network the tests lack).

The tarball fed to ``docker import`` is GNU tar's, streamed through a pipe
(never held in memory): numeric owners, full modes (setuid and setgid
included: sudo stays 4755), symlinks, hard links, device nodes, empty
directories and extended attributes (file capabilities). Its bytes depend on
the tree only (sorted, fixed extended-header names, no atime/ctime), so two
imports of one tree give the same layer, which dockerd stores once. GNU tar
was measured against :mod:`tarfile` writing into a pipe from a thread, for the
280 MiB tree: 0.3 s against 1.4 s to produce the stream, 3.0 s against 4.1 s
for the whole import (docs/docker-notes.md).

Cache: the image carries the labels ``kiln.tier``, ``kiln.base-key`` and
``kiln.import-version`` (:data:`IMPORT_VERSION`, bumped when what goes into the
import changes); a present image with the right labels is a hit. One import per
reference and dockerd at a time within a process (a lock per reference);
another process importing the same image concurrently is tolerated: both
imports succeed, the tag ends on one of them, and the other is an untagged
twin sharing its layer. After an import, older kiln images of the tier (other
base keys or import versions) are removed unless a container still uses them.

Errors: :class:`~kiln.engine.errors.ImageNotFound` for an unknown tier or a
missing base tree, :class:`DockerImageError` (an
:class:`~kiln.engine.errors.EngineError`) when tar, dockerd or the agent
build fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
import requests.exceptions

from kiln.images import BaseTree, ImageError, Progress, find_base
from kiln.images import agent as agent_build

from ..errors import EngineError, ImageNotFound

#: Where the engine bind-mounts the guest agent zipapp (read-only) in a container.
AGENT_PATH = "/usr/lib/kiln/agent.pyz"
#: The image repository of tier ``t`` is ``kiln/t``; its tag, the base key's first 16 hex.
REPOSITORY = "kiln"
LABEL_TIER = "kiln.tier"
LABEL_BASE_KEY = "kiln.base-key"
LABEL_IMPORT_VERSION = "kiln.import-version"
#: Bump when what an import puts into the image changes (tar options, image config).
IMPORT_VERSION = 1

#: GNU tar, reproducibly: numeric owners, xattrs in PAX headers (SCHILY.xattr.*,
#: which dockerd applies), entries sorted, extended-header names without the
#: PID, no atime/ctime records.
TAR_ARGV = (
    "tar",
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--format=posix",
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--sort=name",
)
_TAR_TIMEOUT = 60.0
# GNU tar's warning (exit status 1) when a file's ctime moved while it was read.
# kiln.images never writes into a published tree, but its VM builds hard-link
# it (``cp -al``) and remove the links again, which moves the ctime of every
# file: the content tar read is intact. Anything else tar reports is an error.
_CHANGED = "file changed as we read it"

log = logging.getLogger("kiln.engine.docker")


#: What the docker SDK raises: its own errors, requests' (connection, timeout) and OSError.
_SDK_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class DockerImageError(EngineError):
    """The image could not be made: tar, ``docker import`` or the agent build failed."""


# --------------------------------------------------------------------------- the image


def ensure_image(
    client: docker.DockerClient,
    tier: str = "minimal",
    *,
    image_dir: Path | None = None,
    progress: Progress | None = None,
) -> str:
    """The reference of ``tier``'s current image in ``client``'s dockerd, imported if needed.

    ``image_dir`` is kiln.images' cache
    (default: its default). ``progress`` gets messages on the slow path only
    (default: the ``kiln.engine.docker`` logger). Blocking: call it in a thread
    from async code.
    """
    base = _base(tier, image_dir)
    reference = _reference(base)
    if _is_current(client, reference, base):
        return reference
    with _import_lock(client, reference):
        if _is_current(client, reference, base):  # another thread imported it meanwhile
            return reference
        report = progress or log.info
        report(f"importing the {base.tier} rootfs into dockerd (about 10 s)…")
        started = time.monotonic()
        image_id = _import(client, base, reference)
        report(f"imported {reference} in {time.monotonic() - started:.1f} s")
        for removed in _remove_stale(client, base, keep=image_id):
            report(f"removed the old {base.tier} image {removed}")
    return reference


def image_exists(
    client: docker.DockerClient, tier: str = "minimal", *, image_dir: Path | None = None
) -> bool:
    """True if ``tier``'s current image is in the dockerd (False also without a base tree)."""
    try:
        base = _base(tier, image_dir)
    except ImageNotFound:
        return False
    return _is_current(client, _reference(base), base)


def _reference(base: BaseTree) -> str:
    """``kiln/<tier>:<first 16 hex of the base key>``."""
    return f"{REPOSITORY}/{base.tier}:{base.key[:16]}"


def _base(tier: str, image_dir: Path | None) -> BaseTree:
    try:
        base = find_base(tier, image_dir)
    except ImageError as exc:  # UnknownTier
        raise ImageNotFound(str(exc)) from exc
    if base is None:
        raise ImageNotFound(
            f"the {tier} base rootfs is not built: run `python -m kiln.images ensure"
            f" --tier {tier}` (it downloads Debian packages; do it outside a network namespace)"
        )
    return base


def _labels(base: BaseTree) -> dict[str, str]:
    return {
        LABEL_TIER: base.tier,
        LABEL_BASE_KEY: base.key,
        LABEL_IMPORT_VERSION: str(IMPORT_VERSION),
    }


@contextlib.contextmanager
def _docker_errors(what: str) -> Iterator[None]:
    """Translate the docker SDK's (and requests') exceptions into DockerImageError."""
    try:
        yield
    except _SDK_ERRORS as exc:
        raise DockerImageError(f"{what}: {exc}") from exc


def _is_current(client: Any, reference: str, base: BaseTree) -> bool:
    with _docker_errors(f"inspecting {reference}"):
        try:
            attrs = client.api.inspect_image(reference)
        except docker.errors.ImageNotFound:
            return False
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return all(labels.get(k) == v for k, v in _labels(base).items())


_locks_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}


@contextlib.contextmanager
def _import_lock(client: Any, reference: str) -> Iterator[None]:
    """One import of ``reference`` per dockerd at a time in this process."""
    with _docker_errors("asking dockerd for its id"):
        daemon = str(client.api.info()["ID"])
    with _locks_guard:
        lock = _locks.setdefault((daemon, reference), threading.Lock())
    with lock:
        yield


def _import(client: Any, base: BaseTree, reference: str) -> str:
    """``docker import`` of the base tree as ``reference``; returns the new image's id."""
    repository, _, tag = reference.partition(":")
    changes = ["LABEL " + " ".join(f"{k}={v}" for k, v in _labels(base).items())]
    with _tar(base.root) as tar:
        try:
            answer = client.api.import_image(
                src=tar.stdout, repository=repository, tag=tag, changes=changes, stream_src=True
            )
            image_id = _imported_id(answer)
        except _SDK_ERRORS as exc:
            # A tar that failed by itself ended the stream early: its message is the cause.
            raise DockerImageError(tar.failure(wait=False) or f"docker import: {exc}") from exc
        except DockerImageError as exc:
            raise DockerImageError(tar.failure(wait=False) or str(exc)) from exc
        failure = tar.failure(wait=True)
    if failure is not None:
        with contextlib.suppress(docker.errors.APIError):  # a truncated or partial tree
            client.api.remove_image(image_id, force=True)
        raise DockerImageError(failure)
    return image_id


def _imported_id(answer: str) -> str:
    """The image id from ``/images/create``'s JSON stream, or the error it carries."""
    image_id = None
    for line in answer.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        if "error" in doc or "errorDetail" in doc:
            detail = doc.get("error") or (doc.get("errorDetail") or {}).get("message")
            raise DockerImageError(f"docker import failed: {detail}")
        status = str(doc.get("status", ""))
        if status.startswith("sha256:"):
            image_id = status
    if image_id is None:
        raise DockerImageError(f"docker import answered without an image id: {answer[:300]!r}")
    return image_id


@dataclass(frozen=True, slots=True)
class _Tar:
    """A running GNU tar writing a tree to ``stdout`` (a pipe); see :func:`_tar`."""

    root: Path
    proc: subprocess.Popen[bytes]
    errors: IO[bytes]

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def failure(self, *, wait: bool) -> str | None:
        """What went wrong with tar, or None if it succeeded (or, ``wait=False``, still runs).

        Wait only after the stream was read to its end.
        """
        try:
            code = self.proc.wait(timeout=_TAR_TIMEOUT) if wait else self.proc.poll()
        except subprocess.TimeoutExpired:
            return f"tar of {self.root} did not finish in {_TAR_TIMEOUT:.0f} s"
        if code is None:
            return None
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        if code == 0 or (code == 1 and all(_CHANGED in line for line in lines)):
            return None
        tail = "\n".join(lines[-10:])
        return f"tar of {self.root} exited with status {code}: {tail}".rstrip()


@contextlib.contextmanager
def _tar(root: Path) -> Iterator[_Tar]:
    """GNU tar of ``root``, streamed through a pipe; killed on the way out if it still runs.

    tar's stderr goes to a file: a full stderr pipe would block it.
    """
    if shutil.which(TAR_ARGV[0]) is None:
        raise DockerImageError("tar is not installed (Debian package tar)")
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [*TAR_ARGV, "-C", str(root), "-cf", "-", "."],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        tar = _Tar(root, proc, errors)
        try:
            yield tar
        finally:
            tar.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _remove_stale(client: Any, base: BaseTree, keep: str) -> list[str]:
    """Remove kiln images of ``base.tier`` made from other inputs; in-use ones stay."""
    current = _labels(base)
    removed = []
    with _docker_errors("listing kiln images"):
        images = client.api.images(filters={"label": f"{LABEL_TIER}={base.tier}"})
    for image in images:
        labels = image.get("Labels") or {}
        if image["Id"] == keep or all(labels.get(k) == v for k, v in current.items()):
            continue  # this import, or a concurrent twin of it
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        name = tags[0] if tags else image["Id"]
        try:
            client.api.remove_image(image["Id"])
        except docker.errors.APIError as exc:
            log.info("kept the old image %s: %s", name, exc.explanation or exc)
            continue
        removed.append(name)
    return removed


# --------------------------------------------------------------------------- the agent


def agent_zipapp(state_dir: Path) -> Path:
    """The current guest agent zipapp, ``state_dir/agents/<digest>.pyz`` (built if missing).

    ``<digest>`` is :func:`kiln.images.agent.zipapp_digest` (the archive's
    contents), so the file for a digest never changes once written: it appears
    by an atomic rename and is never deleted (a running container may have it
    bind-mounted; each is ~600 KB). Building to learn the digest takes ~40 ms.
    """
    agents = state_dir / "agents"
    try:
        agents.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=agents, prefix=".build-") as tmp:
            built = agent_build.build_agent(Path(tmp) / "agent.pyz")
            final = agents / f"{agent_build.zipapp_digest(built)}.pyz"
            if not final.exists():
                built.chmod(0o444)
                os.replace(built, final)  # a concurrent twin has the same bytes
    except (ImageError, OSError) as exc:
        raise DockerImageError(f"cannot provide the guest agent zipapp: {exc}") from exc
    return final
