"""The first-boot marker (:mod:`kiln.guest.started`): set up once, never again."""

from __future__ import annotations

from pathlib import Path

from kiln.guest.started import first_start, mark_started


def test_first_start_until_marked(tmp_path: Path) -> None:
    marker = str(tmp_path / "var/lib/kiln/started")
    assert first_start(marker)
    mark_started(marker, durable=True)
    assert Path(marker).is_file()
    assert not first_start(marker)
    mark_started(marker)  # again: harmless
    assert not first_start(marker)


def test_a_marker_that_cannot_be_written_is_logged_not_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    marker = str(tmp_path / "file/started")  # its directory is a file
    mark_started(marker, durable=True)
    assert first_start(marker)
