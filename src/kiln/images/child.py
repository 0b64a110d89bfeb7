"""Building an image in a child process that the caller owns and can stop.

A build (apt, mmdebstrap, chroot, mkfs) takes minutes, and a thread running it
cannot be stopped: a daemon told to shut down would wait for it or leave it
running. :func:`ensure_image_in_child` runs ``python -m kiln.images ensure
--json`` instead, as the leader of a process group of its own and, as root, in
a mount namespace of its own (mmdebstrap in root mode mounts /proc, /sys and
device nodes into the tree it builds; a killed build then leaves no mounts for
the next build's cleanup to walk into). Cancelling the call stops the build:
SIGTERM to the group, ``grace`` seconds, then SIGKILL; it returns (raising
:class:`asyncio.CancelledError`) only once no process of the group is left.

A stopped build never passes for a finished one: an entry of the image cache
is published by a rename once its manifest is written, and what a killed build
leaves is a ``.tmp-*`` directory that the next build removes under the build
lock (:mod:`kiln.images.cache`).

The child reports progress on stderr (``kiln images: ...`` lines, passed on to
``progress``) and the image as one JSON object on stdout. ``$KILN_IMAGE_BUILDER``
(tests only) replaces ``python -m kiln.images`` with another program speaking
the same protocol, e.g. one that takes long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Final

from .builder import Image, Progress, find_image, load_image
from .buildlog import BuildFailed
from .cache import default_image_dir
from .errors import ImageError, UnknownTier
from .registry import is_known
from .tiers import TIERS

#: Seconds a stopped build gets between SIGTERM and SIGKILL (mmdebstrap unmounts
#: and removes its temporary files on SIGTERM, unless it is in a step that
#: ignores it).
TERM_GRACE_S: Final = 3.0
#: After SIGKILL, how long the group's processes may take to be gone.
_KILL_WAIT_S: Final = 5.0
_POLL_S: Final = 0.05
#: Tests only: the command (shell words) that replaces ``python -m kiln.images``.
BUILDER_ENV: Final = "KILN_IMAGE_BUILDER"
_PREFIX: Final = "kiln images: "
_ERROR: Final = "kiln images: error: "
#: How :class:`BuildFailed` reads as text (its message may span lines).
_STEP_FAILED: Final = re.compile(
    r"^step '(?P<step>[\w-]+)' failed: (?P<message>.*)\nbuild log: (?P<log>\S+)$", re.DOTALL
)


def builder_argv(tier: str, image_dir: Path | None) -> list[str]:
    """The child's command line."""
    custom = os.environ.get(BUILDER_ENV)
    program = shlex.split(custom) if custom else [sys.executable, "-m", "kiln.images"]
    argv = [*program, "ensure", "--tier", tier, "--json"]
    if image_dir is not None:
        argv += ["--image-dir", str(image_dir)]
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare is not None:
        argv = [unshare, "--mount", "--propagation", "private", "--", *argv]
    return argv


async def ensure_image_in_child(
    tier: str,
    image_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    grace: float = TERM_GRACE_S,
) -> Image:
    """The current image of ``tier``: found in the cache, or built by a child process
    (stopped if this call is cancelled; see the module's doc)."""
    if not is_known(tier, image_dir or default_image_dir()):
        raise UnknownTier(tier, list(TIERS))
    try:
        # Cheap (hashes the inputs, a fraction of a second) and never builds.
        found = await asyncio.to_thread(find_image, tier, image_dir)
    except ImageError:
        found = None  # the build says what is wrong, with its progress
    if found is not None:
        return found
    return await build_in_child(tier, image_dir, progress, grace=grace)


async def build_in_child(
    tier: str,
    image_dir: Path | None,
    progress: Progress | None = None,
    *,
    grace: float = TERM_GRACE_S,
) -> Image:
    """Run the builder for ``tier`` to its end and load the image it reports."""
    argv = builder_argv(tier, image_dir)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=1 << 20,
        )
    except OSError as exc:
        raise ImageError(f"cannot run the image builder {argv[0]}: {exc.strerror or exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    relay = asyncio.ensure_future(_relay(proc.stderr, progress))
    reading = asyncio.ensure_future(proc.stdout.read())
    try:
        code = await proc.wait()
        # Whatever the builder left running in its group (it should leave nothing)
        # goes too, also so that it cannot hold the pipes open.
        await stop_group(proc, grace=0)
        tail, out = await asyncio.gather(relay, reading)
    except BaseException:
        for task in (relay, reading):
            task.cancel()
        await stop_group(proc, grace)
        await asyncio.wait({relay, reading})
        raise
    if code != 0:
        text = _error_text(tail)
        failed = _STEP_FAILED.match(text)
        if failed is not None:  # the builder named the step and kept its log
            raise BuildFailed(failed["step"], failed["message"], Path(failed["log"]))
        how = f"was killed by {_signame(-code)}" if code < 0 else f"exited with {code}"
        raise ImageError(f"the image build {how}: {text}")
    return _reported_image(out)


async def stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """End the process group led by ``proc``: SIGTERM, ``grace`` seconds, SIGKILL;
    return once it is empty. Cancelled meanwhile, it sends SIGKILL at once."""
    try:
        await _stop_group(proc, grace)
    except asyncio.CancelledError:
        _signal_group(proc.pid, signal.SIGKILL)
        raise


async def _stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    pgid = proc.pid
    if not _group_alive(pgid):
        await proc.wait()
        return
    _signal_group(pgid, signal.SIGTERM)
    if not await _gone(pgid, grace):
        _signal_group(pgid, signal.SIGKILL)
    await proc.wait()
    # The others were reparented to init when the leader died; init reaps them.
    await _gone(pgid, _KILL_WAIT_S)


async def _gone(pgid: int, within: float) -> bool:
    """Wait until no process of the group is left; False if some still are after ``within``."""
    deadline = time.monotonic() + within
    while True:
        if not _group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. A zombie does not count: the
    group's orphans are reaped by init, which may take its time."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def _relay(stream: asyncio.StreamReader, progress: Progress | None) -> list[str]:
    """Pass the child's stderr lines on to ``progress``; return the last ones."""
    tail: deque[str] = deque(maxlen=40)
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line over the limit: dropped
            continue
        if not raw:
            return list(tail)
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        if progress is not None and line.startswith(_PREFIX) and not line.startswith(_ERROR):
            progress(line.removeprefix(_PREFIX))


def _error_text(tail: list[str]) -> str:
    """The builder's error message (it may span lines), or the end of its stderr."""
    for i in range(len(tail) - 1, -1, -1):
        if tail[i].startswith(_ERROR):
            return "\n".join([tail[i].removeprefix(_ERROR), *tail[i + 1 :]]).strip()
    return "\n".join(tail[-15:]).strip() or "no message"


def _reported_image(out: bytes) -> Image:
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        doc = json.loads(lines[-1])
        path = Path(doc["path"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise ImageError(f"the image builder printed no image: {out[-500:]!r}") from None
    image = load_image(path)
    if image is None:
        raise ImageError(f"the image builder reported {path}, which is not a finished image")
    return image


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
