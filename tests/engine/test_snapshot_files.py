"""Snapshot metadata and RAM-file helpers (real files, no VM)."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

from kiln.engine.qemu.snapshot import (
    Prefetcher,
    SnapshotMeta,
    SnapshotRecord,
    cachestat,
    create_ram_file,
    load_meta,
    prefetch_ram,
    ram_inode,
    save_meta,
    sync_ram_file,
)

MIB = 1 << 20


def record(gen: int, kind: str = "diff") -> SnapshotRecord:
    return SnapshotRecord(gen, kind, 1.0, 60_000, 4 * MIB, 80 * MIB, 40.0, 5.0, 20.0)


def test_meta_round_trip_and_history(tmp_path: Path) -> None:
    meta = SnapshotMeta(ram_inode=42)
    for gen in range(1, 26):
        meta.record(record(gen, "full" if gen == 1 else "diff"))
    meta.valid = True
    save_meta(tmp_path / "snapshot.json", meta)
    loaded = load_meta(tmp_path / "snapshot.json")
    assert loaded == meta
    assert loaded.generation == 25 and loaded.last == record(25)
    assert len(loaded.history) == 20  # bounded


def test_missing_or_corrupt_meta_never_vouches_for_a_snapshot(tmp_path: Path) -> None:
    assert not load_meta(tmp_path / "nothing.json").valid
    bad = tmp_path / "bad.json"
    bad.write_text('{"valid": tru')
    assert not load_meta(bad).valid
    bad.write_text("[1, 2]")
    assert not load_meta(bad).valid


def test_ram_file_is_sparse_until_touched(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    ino = create_ram_file(path, 64 * MIB)
    assert ram_inode(path) == ino
    assert path.stat().st_size == 64 * MIB
    assert path.stat().st_blocks == 0
    assert ram_inode(tmp_path / "gone") is None


def test_sync_writes_dirty_pages_and_drops_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    create_ram_file(path, 16 * MIB)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 16 * MIB, mmap.MAP_SHARED) as mem:  # like QEMU's share=on
            for off in range(0, 4 * MIB, 4096):
                mem[off] = 1
        before = cachestat(fd)
    finally:
        os.close(fd)
    stats = sync_ram_file(path)
    assert stats.allocated_bytes >= 4 * MIB
    if before is not None:  # Linux >= 6.5
        assert stats.dirty_bytes is not None and stats.dirty_bytes >= 4 * MIB
        fd = os.open(path, os.O_RDONLY)
        try:
            after = cachestat(fd)
        finally:
            os.close(fd)
        assert after is not None and after[1] == 0  # nothing dirty
    # A second sync has nothing left to write.
    again = sync_ram_file(path)
    assert again.dirty_bytes in (0, None)


def test_prefetch_reads_only_the_data(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    create_ram_file(ram, 64 << 20)
    with open(ram, "r+b") as f:
        for offset in (0, 8 << 20, (64 << 20) - 4096):
            f.seek(offset)
            f.write(b"x" * 4096)
    read = prefetch_ram(ram, chunk=1 << 20)
    # Whole filesystem blocks of data, never the 64 MiB of holes.
    assert 3 * 4096 <= read < 8 << 20
    assert prefetch_ram(tmp_path / "missing") == 0


def test_prefetch_stops_when_asked(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.write(b"x" * (8 << 20))
    stop = threading.Event()
    assert prefetch_ram(ram, chunk=1 << 20, stop=stop) == 8 << 20
    stop.set()
    assert prefetch_ram(ram, chunk=1 << 20, stop=stop) == 0


def test_prefetcher_owns_its_threads(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.write(b"x" * (16 << 20))
    prefetcher = Prefetcher()
    before = set(threading.enumerate())
    for _ in range(3):
        prefetcher.start(ram)
    prefetcher.close()
    assert prefetcher.running == 0
    assert set(threading.enumerate()) == before  # joined, none left behind
    prefetcher.start(ram)  # closed: a restore goes without
    assert prefetcher.running == 0 and set(threading.enumerate()) == before
