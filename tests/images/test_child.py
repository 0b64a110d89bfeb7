"""Image builds in a child process the caller owns (:mod:`kiln.images.child`).

Real child processes throughout: the stand-in builder of the shutdown tests
(``tests/server/slow_builder.py``, the real cache code with a sleeping
grandchild that ignores SIGTERM) and small shell programs for the failures.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from kiln.images import ImageError, UnknownTier, list_images
from kiln.images.child import BUILDER_ENV, builder_argv, ensure_image_in_child

SLOW_BUILDER = Path(__file__).resolve().parents[1] / "server" / "slow_builder.py"


def _group(pgid: int) -> list[int]:
    alive = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry))
    return alive


@pytest.fixture
def slow_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUILDER_ENV, f"{sys.executable} {SLOW_BUILDER}")
    monkeypatch.setenv("SLOW_BUILD_S", "600")


def test_the_default_builder_is_kiln_images_in_a_mount_namespace_of_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(BUILDER_ENV, raising=False)
    argv = builder_argv("minimal", tmp_path)
    tail = [sys.executable, "-m", "kiln.images", "ensure", "--tier", "minimal", "--json"]
    assert argv[-len(tail) - 2 :] == [*tail, "--image-dir", str(tmp_path)]
    if os.geteuid() == 0:
        assert argv[1:5] == ["--mount", "--propagation", "private", "--"]


def test_cancelling_a_build_ends_its_whole_process_group(
    slow_builder: None, tmp_path: Path
) -> None:
    messages: list[str] = []

    async def main() -> float:
        build = asyncio.create_task(
            ensure_image_in_child("minimal", tmp_path, messages.append, grace=0.5)
        )
        deadline = time.monotonic() + 30
        while not any("sleeper" in m for m in messages):
            assert time.monotonic() < deadline and not build.done(), messages
            await asyncio.sleep(0.02)
        started = time.monotonic()
        build.cancel()
        with pytest.raises(asyncio.CancelledError):
            await build
        return time.monotonic() - started

    took = asyncio.run(main())
    found = re.search(r"process group (\d+), sleeper (\d+)", " ".join(messages))
    assert found is not None
    assert _group(int(found[1])) == []  # the sleeper ignored SIGTERM: SIGKILL got it
    assert 0.5 <= took < 3
    assert list_images(tmp_path) == []  # a stopped build is no image


def test_a_finished_build_is_loaded_from_what_the_builder_reports(
    slow_builder: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLOW_BUILD_S", "0")
    messages: list[str] = []
    image = asyncio.run(ensure_image_in_child("minimal", tmp_path, messages.append))
    assert image.digest == "5" * 64 and image.path.parent == tmp_path / "images"
    assert image.kernel.read_bytes() == b"placeholder\n"
    assert any(m.startswith("built minimal image") for m in messages)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (
            "echo 'kiln images: mmdebstrap…' >&2; "
            "printf 'kiln images: error: mmdebstrap exited with 1\\nE: no space\\n' >&2; exit 1",
            "the image build exited with 1: mmdebstrap exited with 1\nE: no space",
        ),
        ("kill -KILL $$", "the image build was killed by SIGKILL: no message"),
        ("echo not json", "the image builder printed no image"),
        ('echo \'{"path": "/nonexistent"}\'', "reported /nonexistent, which is not a finished"),
    ],
)
def test_a_failed_build_is_an_image_error_with_the_builders_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str, message: str
) -> None:
    monkeypatch.setenv(BUILDER_ENV, f"sh -c {shlex.quote(script)} builder")
    with pytest.raises(ImageError) as raised:
        asyncio.run(ensure_image_in_child("minimal", tmp_path))
    assert message in str(raised.value)


def test_an_unknown_tier_starts_no_build(tmp_path: Path) -> None:
    with pytest.raises(UnknownTier):
        asyncio.run(ensure_image_in_child("enormous", tmp_path))
