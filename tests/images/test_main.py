"""``python -m kiln.images``: the shell entry point scripts use before tests go offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.images.__main__ import main


def test_cmdline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cmdline"]) == 0
    assert capsys.readouterr().out.startswith("console=ttyS0 ")


def test_list_and_find_on_an_empty_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", "--image-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
    assert main(["find", "--image-dir", str(tmp_path)]) == 1
    assert "no current minimal image" in capsys.readouterr().err


def test_unknown_tier_is_an_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--tier", "enormous"]) == 1
    assert "unknown image tier 'enormous' (known: minimal)" in capsys.readouterr().err


def test_a_bad_definition_file_is_an_error_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    definition = tmp_path / "d.yaml"
    definition.write_text("name: tiny\npackages: [Bad]\n")
    assert main(["ensure", "--definition", str(definition), "--image-dir", str(tmp_path)]) == 1
    assert "packages[0]: 'Bad' is not a Debian package name" in capsys.readouterr().err
