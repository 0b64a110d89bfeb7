"""Snapshots: guest RAM lives in a per-sandbox file, so the file *is* the snapshot.

QEMU maps ``<sandbox>/ram`` with ``memory-backend-file,share=on``: every page
the guest touches is a page of that file's page cache. Stopping a sandbox
(see :meth:`kiln.engine.qemu.thermal.ThermalControl.snapshot`) is:

1. QMP ``stop`` (vCPUs halt; QEMU flushes the disks);
2. migrate with the ``x-ignore-shared`` capability into ``state.bin``: only
   device state (~60 KB, ~10 ms), the shared RAM block is skipped;
3. ``quit``; QEMU exits and unmaps the RAM;
4. :func:`sync_ram_file`: ``fdatasync`` the RAM file -- the first time it writes
   every page the guest touched (*full*), later only the pages dirtied since
   the previous stop (*diff*; the kernel also writes dirty pages back in the
   background while the VM runs) -- then ``POSIX_FADV_DONTNEED`` drops the now
   clean pages from the page cache: the host RAM is free;
5. mark the snapshot valid in ``snapshot.json``.

Restoring maps the same file in a new QEMU started with ``-incoming defer``,
loads ``state.bin`` and continues: guest pages fault in from the file lazily.

Why not ``share=off`` (a private mapping)? Measured on QEMU 7.2: ``x-ignore-
shared`` only skips RAM blocks that are *shared*, so with ``share=off`` the
whole RAM goes into the migration stream (65 MB, ~0.5 s for an idle 256 MB
guest) and the file itself stays empty. With ``share=on`` a restored guest
writes into the file, so a snapshot is valid only between a completed stop
and the next restore; ``snapshot.json`` records that (``valid``), and a
restore clears it right before the restored guest runs (QEMU itself does not
write into the RAM of an incoming VM: a restore that dies before that leaves
the snapshot as good as it was).

If the RAM file is gone or was replaced while the VM ran (the "base" of the
diff is missing), the stop falls back to a *full* snapshot: RAM is migrated
into ``state.bin`` too and a fresh RAM file is created for the restore. A clone
fresh from a template takes the same path on its first stop: it maps the
template's RAM privately (``SnapshotMeta.ram_template``, see :mod:`.templates`)
and has no RAM file of its own yet.

Measured on the dev host (TCG, idle 512 MB guest, kernel 6.18, ext4): device
state 65 KiB; first stop ("full") wrote the 116 MiB the guest had touched, 80 ms
in all; the following stops ("diff") wrote 78-82 MiB in 34-40 ms. A diff is
that large for an idle guest because QEMU madvises guest RAM ``MADV_HUGEPAGE``,
so the file sits in the page cache as 2 MiB folios and dirtiness is tracked per
2 MiB: right after a restore the guest writes into ~40 distinct 2 MiB regions
(page-table accessed/dirty bits, kernel data). The kernel's own writeback also
flushes dirty pages every ~30 s while the VM runs, so a stop only ever writes
what changed since then. A restore (new QEMU, load state, ``cont``) takes
~60 ms; the first exec after it is slower than usual (~400 ms) because TCG
must translate the guest's code again.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

META_VERSION: Final = 1
HISTORY_LIMIT: Final = 20
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_SYS_CACHESTAT: Final = 451  # x86_64 and most other architectures (Linux ≥ 6.5)


@dataclass(slots=True)
class SnapshotRecord:
    """One completed stop."""

    generation: int
    kind: str  # "full" or "diff"
    created_at: float
    state_bytes: int
    ram_written_bytes: int | None  # dirty page cache of the RAM file before the sync
    ram_allocated_bytes: int
    total_ms: float
    migrate_ms: float
    sync_ms: float
    ram_in_state: bool = False  # fallback: RAM is inside state.bin
    #: A clone's first stop: time to move its RAM from the stream into its own file.
    settle_ms: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(slots=True)
class SnapshotMeta:
    """``snapshot.json``: is there a usable snapshot, and what the stops measured."""

    valid: bool = False
    generation: int = 0
    ram_inode: int | None = None  # the RAM file QEMU mapped at its last start
    ram_in_state: bool = False
    ram_synced: bool = False  # the RAM file was synced since it was created or refilled
    #: The template RAM file QEMU maps copy-on-write (``share=off``) instead of the
    #: sandbox's own: a clone not stopped since its create (see :mod:`.templates`).
    ram_template: str | None = None
    last: SnapshotRecord | None = None
    history: list[SnapshotRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["version"] = META_VERSION
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotMeta:
        last = data.get("last")
        template = data.get("ram_template")
        return cls(
            valid=bool(data.get("valid", False)),
            generation=int(data.get("generation", 0)),
            ram_inode=data.get("ram_inode"),
            ram_in_state=bool(data.get("ram_in_state", False)),
            ram_synced=bool(data.get("ram_synced", False)),
            ram_template=template if isinstance(template, str) else None,
            last=SnapshotRecord.from_json(last) if isinstance(last, dict) else None,
            history=[SnapshotRecord.from_json(h) for h in data.get("history", [])],
        )

    def record(self, rec: SnapshotRecord) -> None:
        self.last = rec
        self.generation = rec.generation
        self.ram_in_state = rec.ram_in_state
        self.history = [*self.history, rec][-HISTORY_LIMIT:]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_meta(path: Path) -> SnapshotMeta:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return SnapshotMeta()
    except (OSError, ValueError):
        return SnapshotMeta()  # unreadable metadata never vouches for a snapshot
    return SnapshotMeta.from_json(data) if isinstance(data, dict) else SnapshotMeta()


def save_meta(path: Path, meta: SnapshotMeta) -> None:
    write_json_atomic(path, meta.to_json())


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_libc: ctypes.CDLL | None = None


def cachestat(fd: int) -> tuple[int, int] | None:
    """(cached, dirty+writeback) bytes of a file's page cache; None before Linux 6.5."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    rng, cs = _CacheStatRange(0, 0), _CacheStat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(cs), 0) != 0:
        return None
    return cs.nr_cache * _PAGE, (cs.nr_dirty + cs.nr_writeback) * _PAGE


@dataclass(frozen=True, slots=True)
class SyncStats:
    dirty_bytes: int | None  # what this sync had to write (None: kernel cannot tell)
    allocated_bytes: int  # disk blocks of the RAM file: every page ever touched
    sync_ms: float


def sync_ram_file(path: Path) -> SyncStats:
    """Write the RAM file's dirty pages to disk and drop it from the page cache.

    Blocking (call it in a thread). Only valid once no process maps the file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = cachestat(fd)
        start = time.perf_counter()
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        elapsed = (time.perf_counter() - start) * 1000
        blocks = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    return SyncStats(before[1] if before else None, blocks, elapsed)


def prefetch_ram(path: Path, chunk: int = 4 << 20, stop: threading.Event | None = None) -> int:
    """Read the RAM file's data (not its holes) into the page cache; bytes read.

    Blocking and best-effort (errors end it quietly); ``stop`` ends it early, a
    chunk later. A restore runs it in a thread (:class:`Prefetcher`) while QEMU
    starts: the guest then finds most of its memory cached instead of faulting
    it in from disk page by page (measured: first exec after a restore ~60 ms
    sooner).
    """
    done = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        offset = 0
        while True:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                break
            end = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < end:
                if stop is not None and stop.is_set():
                    return done
                n = len(os.pread(fd, min(chunk, end - offset), offset))
                if n == 0:
                    return done
                offset += n
                done += n
    except OSError:
        pass
    finally:
        os.close(fd)
    return done


class Prefetcher:
    """The RAM pre-reads of the restores in progress, one thread each, owned here:
    :meth:`close` stops them (within a chunk's read) and joins them."""

    def __init__(self) -> None:
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self, path: Path, nice: int = 0) -> None:
        """Pre-read ``path`` in the background (nothing once closed), in a thread of
        niceness ``nice``."""
        with self._lock:
            if self._stop.is_set():
                return
            thread = threading.Thread(target=self._run, args=(path, nice), name="kiln-prefetch")
            self._threads.add(thread)
            thread.start()  # under the lock: close() never joins a thread not yet started

    def _run(self, path: Path, nice: int) -> None:
        try:
            if nice:
                with contextlib.suppress(OSError):  # per thread on Linux
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            prefetch_ram(path, stop=self._stop)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every pre-read and wait for its thread (blocking)."""
        with self._lock:
            self._stop.set()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)


def fsync_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_ram_file(path: Path, size: int) -> int:
    """A new sparse RAM file of ``size`` bytes (mode 0600: it is guest memory); its inode.

    Always a new inode, never the old one truncated: clones may map a template's
    RAM file copy-on-write, and a truncate would zero their unwritten pages."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def ram_inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
