"""The log of one image build: progress with the elapsed time, the failing step named.

Every message of a build goes to the caller's ``progress`` (prefixed with the
step, ``[base] mmdebstrap ...``) and to ``<image dir>/logs/<tier>-<UTC time>-<pid>.log``.
A step that fails raises :class:`BuildFailed`, which names the step and the log,
into which the failing command's whole output was written; the log of a failed
or a real build is kept, the log of a build that only found its image is removed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from .errors import ImageError

Progress = Callable[[str], None]
LOGS_DIR = "logs"
#: Logs kept in the directory, the newest (every real build writes one).
KEEP_LOGS = 100


class BuildLog:
    """Progress of one build: passed on to ``progress`` and appended to a log file
    (``<image dir>/logs/<tier>-<UTC time>.log``) with the elapsed time.

    A failing step is named in the error (:class:`BuildFailed`), which carries the
    log's path; the log of a failed build is kept, the log of a build that only
    found its image in the cache is removed, and only the :data:`KEEP_LOGS`
    newest logs stay in the directory.
    """

    def __init__(self, path: Path, progress: Progress) -> None:
        self.path = path
        self._progress = progress
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in open())
        self._started = time.monotonic()
        self.keep = True
        self.step_name = ""

    @classmethod
    @contextmanager
    def open(cls, image_dir: Path, tier: str, progress: Progress) -> Iterator[BuildLog]:
        logs = image_dir / LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        _prune(logs, KEEP_LOGS - 1)
        log = cls(logs / f"{tier}-{stamp}-{os.getpid()}.log", progress)
        try:
            yield log
        except BuildFailed:
            log.keep = True
            raise
        finally:
            log._file.close()
            if not log.keep:
                log.path.unlink(missing_ok=True)

    def __call__(self, message: str) -> None:
        self._write(message)
        self._progress(f"[{self.step_name}] {message}" if self.step_name else message)

    def _write(self, message: str) -> None:
        self._file.write(f"{time.monotonic() - self._started:8.1f}s {message}\n")
        self._file.flush()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        previous, self.step_name = self.step_name, name
        try:
            yield
        except BuildFailed:
            raise
        except (ImageError, OSError) as exc:
            detail = str(getattr(exc, "stderr", "") or "")
            self._write(f"step {name} failed: {exc}")
            if detail:
                self._write("full output of the failing command:\n" + detail.rstrip())
            raise BuildFailed(name, str(exc), self.path) from exc
        finally:
            self.step_name = previous


def _prune(logs: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest logs (a concurrent build may remove one too)."""
    found = []
    for path in logs.glob("*.log"):
        try:
            found.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue
    for _, path in sorted(found, reverse=True)[keep:]:
        path.unlink(missing_ok=True)


class BuildFailed(ImageError):
    """A build step failed; ``log`` is the kept build log."""

    def __init__(self, step: str, message: str, log: Path) -> None:
        super().__init__(f"step {step!r} failed: {message}\nbuild log: {log}")
        self.step = step
        self.log = log
