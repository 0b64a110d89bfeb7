"""What a build step does with a definition's files, and how a failed step is reported:
named, with its log kept (and its message crossing the child process boundary)."""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

import pytest

from kiln.images import BuildFailed, ImageError
from kiln.images.buildlog import KEEP_LOGS, LOGS_DIR, BuildLog
from kiln.images.child import BUILDER_ENV, ensure_image_in_child
from kiln.images.errors import StepFailed
from kiln.images.rootfs import add_files


def test_files_go_into_the_tree_through_its_directory_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")  # merged /usr
    (root / "etc").mkdir()
    (root / "etc/motd").symlink_to("/outside")  # replaced, not followed
    add_files(
        root,
        (
            ("/bin/hello", "#!/bin/sh\n", 0o4755),
            ("/etc/motd", "hi\n", 0o644),
            ("/opt/new/deep/file", "x", 0o600),
        ),
    )
    hello = root / "usr/bin/hello"
    assert hello.read_text() == "#!/bin/sh\n" and hello.stat().st_mode & 0o7777 == 0o4755
    assert not (root / "etc/motd").is_symlink() and (root / "etc/motd").read_text() == "hi\n"
    assert (root / "opt/new/deep/file").stat().st_mode & 0o777 == 0o600
    assert (root / "opt/new").stat().st_mode & 0o777 == 0o755


def test_files_cannot_leave_the_tree_or_replace_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "escape").symlink_to("../..")
    with pytest.raises(ImageError, match="/escape points out of the tree"):
        add_files(root, (("/escape/x", "", 0o644),))
    # An absolute link means the tree's own directory, as in the sandbox.
    (root / "abs").symlink_to("/etc")
    add_files(root, (("/abs/y", "y", 0o644),))
    assert (root / "etc/y").read_text() == "y"
    with pytest.raises(ImageError, match="it is a directory in the image"):
        add_files(root, (("/etc", "", 0o644),))
    (root / "file").write_text("")
    with pytest.raises(ImageError, match="/file is not a directory"):
        add_files(root, (("/file/x", "", 0o644),))


def test_a_failed_step_is_named_and_its_log_kept(tmp_path: Path) -> None:
    messages: list[str] = []
    with pytest.raises(BuildFailed) as raised, BuildLog.open(tmp_path, "t", messages.append) as log:
        log("starting")
        with log.step("base"):
            log("running mmdebstrap")
            raise StepFailed(["mmdebstrap", "x"], 25, "E: line one\nE: the real reason\n")
    failed = raised.value
    assert failed.step == "base"
    assert str(failed).startswith("step 'base' failed: mmdebstrap exited with 25")
    assert str(failed).endswith(f"build log: {failed.log}")
    assert messages == ["starting", "[base] running mmdebstrap"]
    text = failed.log.read_text()
    assert "running mmdebstrap" in text and "step base failed" in text
    assert "full output of the failing command:\nE: line one\nE: the real reason" in text
    assert failed.log.parent == tmp_path / LOGS_DIR


def test_a_build_that_found_its_image_leaves_no_log(tmp_path: Path) -> None:
    with BuildLog.open(tmp_path, "t", lambda _: None) as log:
        log("cached")
        log.keep = False
    assert list((tmp_path / LOGS_DIR).iterdir()) == []


def test_the_step_and_log_cross_the_child_boundary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log = tmp_path / "b.log"
    script = (
        "echo 'kiln images: error: step '\\''kernel'\\'' failed: apt-get exited with 100:' >&2;"
        f" echo 'E: no lists' >&2; echo 'build log: {log}' >&2; exit 1"
    )
    monkeypatch.setenv(BUILDER_ENV, f"sh -c {shlex.quote(script)} builder")
    with pytest.raises(BuildFailed) as raised:
        asyncio.run(ensure_image_in_child("minimal", tmp_path / "cache"))
    assert raised.value.step == "kernel" and raised.value.log == log
    assert "apt-get exited with 100:\nE: no lists" in str(raised.value)
    assert os.fspath(log) in str(raised.value)


def test_only_the_newest_logs_stay(tmp_path: Path) -> None:
    logs = tmp_path / LOGS_DIR
    logs.mkdir()
    for i in range(KEEP_LOGS + 5):
        (logs / f"old-{i:03}.log").write_text("")
        os.utime(logs / f"old-{i:03}.log", (1_000_000 + i, 1_000_000 + i))
    with BuildLog.open(tmp_path, "t", lambda _: None) as log:
        log("a real build")
    kept = sorted(p.name for p in logs.iterdir())
    assert len(kept) == KEEP_LOGS and kept[0] == "old-006.log" and log.path.name in kept
