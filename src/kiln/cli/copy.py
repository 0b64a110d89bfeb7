"""``kiln cp``: files and directory trees between this machine and a sandbox, as tar
streams (the daemon's ``GET``/``PUT /sandboxes/{id}/archive``), like ``docker cp``.

Where things land follows ``docker cp``: into an existing directory under the
source's own name; onto a missing path under that path's name (its parent must
exist); a file may replace a file, a directory may not replace a file. ``-``
is a tar stream on stdin or stdout. A progress bar goes to stderr for a
transfer over :data:`PROGRESS_MIN` bytes when stderr is a terminal.
"""

from __future__ import annotations

import os
import posixpath
import sys
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Final

import click

from . import Failure

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from kiln.sdk import ArchiveDownload, SandboxRef

#: Transfers smaller than this get no progress bar.
PROGRESS_MIN: Final = 1 << 20


class _Meter:
    """Counts bytes; shows a rich progress bar on stderr once past PROGRESS_MIN."""

    def __init__(self, label: str, total: int | None, quiet: bool) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = not quiet and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def add(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._progress is None:
            if self.done < PROGRESS_MIN and (self.total or 0) < PROGRESS_MIN:
                return
            self._start()
        assert self._progress is not None and self._task is not None
        self._progress.update(self._task, completed=self.done)

    def _start(self) -> None:
        from rich.progress import (  # noqa: PLC0415 - rich only when a bar is shown
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        from .output import console  # noqa: PLC0415

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def counted(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.add(len(chunk))
            yield chunk


class _Reader:
    """The chunks of a download as a file object (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        if size < 0:
            size = len(self._buf)
        out, self._buf = self._buf[:size], self._buf[size:]
        return out


def _stat_remote(sandbox: SandboxRef, path: str) -> bool | None:
    """Whether a sandbox path is a directory; None when it does not exist."""
    from kiln.sdk import NotFound  # noqa: PLC0415

    try:
        return sandbox.files.stat(path).is_dir
    except NotFound:
        return None


def _wants_contents(path: str) -> bool:
    """``dir/.``: the directory's content rather than the directory (as docker cp)."""
    return path == "." or path.endswith("/.")


def _split(path: str, paths: ModuleType = posixpath) -> tuple[str, str]:
    """``(parent, name)``; ``paths`` is posixpath for sandbox paths, os.path for local ones."""
    clean = paths.normpath(path)
    return paths.dirname(clean) or ".", paths.basename(clean)


def upload(sandbox: SandboxRef, source: str, dest: str, *, quiet: bool) -> None:
    """Local ``source`` (or ``-``: a tar on stdin) to ``dest`` in ``sandbox``."""
    from kiln.archive.local import pack, tree_size  # noqa: PLC0415

    if source == "-":
        if sys.stdin.isatty():
            raise click.UsageError("no input: pipe a tar stream to stdin, or give a local path")
        if _stat_remote(sandbox, dest) is not True:
            raise Failure(f"{dest}: no such directory in the sandbox", "not found")
        sandbox.files.upload_archive(dest, sys.stdin.buffer)
        return
    if not os.path.lexists(source):
        raise Failure(f"{source}: no such file or directory", "not found")
    is_dir = os.path.isdir(source) and not os.path.islink(source)
    remote = _stat_remote(sandbox, dest)
    if remote is True:
        name = (
            "."
            if is_dir and _wants_contents(source)
            else _split(os.path.abspath(source), os.path)[1]
        )
        target = dest
    elif remote is False:
        if is_dir:
            raise Failure(f"cannot copy a directory onto the file {dest}", "conflict")
        target, name = _split(dest)
    else:
        if dest.endswith("/") and not is_dir:
            raise Failure(f"{dest}: no such directory in the sandbox", "not found")
        target, name = _split(dest)  # the parent must exist: the daemon says 404 otherwise
    meter = _Meter(f"{source} → {dest}", tree_size(source), quiet)
    try:
        sandbox.files.upload_archive(target, meter.counted(pack(source, name)))
    finally:
        meter.close()


def download(sandbox: SandboxRef, source: str, dest: str, *, quiet: bool) -> None:
    """``source`` in ``sandbox`` to local ``dest`` (or ``-``: a tar on stdout)."""
    from kiln.archive.local import extract  # noqa: PLC0415

    if dest == "-" and sys.stdout.isatty():
        raise click.UsageError("not writing a tar stream to a terminal: redirect stdout")
    with sandbox.files.download_archive(source) as archive:
        if dest == "-":
            out = sys.stdout.buffer
            meter = _Meter(source, None, quiet)
            try:
                for chunk in meter.counted(archive):
                    out.write(chunk)
                out.flush()
            finally:
                meter.close()
            return
        target, rename = _local_target(archive, source, dest)
        total = None if archive.stat.is_dir else archive.stat.size
        meter = _Meter(f"{source} → {dest}", total, quiet)
        try:
            extract(_Reader(meter.counted(archive)), target, rename)
        finally:
            meter.close()


def _local_target(
    archive: ArchiveDownload, source: str, dest: str
) -> tuple[str, tuple[str, str] | None]:
    """Where to extract, and the top member's new name (None: keep it)."""
    is_dir = archive.stat.is_dir
    if os.path.isdir(dest):
        return dest, (archive.root, ".") if is_dir and _wants_contents(source) else None
    if os.path.lexists(dest):
        if is_dir:
            raise Failure(f"cannot copy a directory onto the file {dest}", "conflict")
    elif dest.endswith(os.sep) and not is_dir:
        raise Failure(f"{dest}: no such directory", "not found")
    parent, name = _split(dest, os.path)
    if not os.path.isdir(parent):
        raise Failure(f"{parent}: no such directory", "not found")
    return parent, (archive.root, name)
