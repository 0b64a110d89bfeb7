from pathlib import Path

import pytest

from kiln.server.e2b.tokens import EnvdTokens


def test_tokens_are_per_sandbox_and_survive_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "envd.key"
    tokens = EnvdTokens.load(path)
    a, b = tokens.issue("sb-a"), tokens.issue("sb-b")
    assert a != b
    assert path.stat().st_mode & 0o777 == 0o600
    again = EnvdTokens.load(path)
    assert again.issue("sb-a") == a
    assert again.verify("sb-a", a)
    assert not again.verify("sb-b", a)
    assert not again.verify("sb-a", None)
    assert not again.verify("sb-a", "")


def test_another_key_issues_other_tokens(tmp_path: Path) -> None:
    one = EnvdTokens.load(tmp_path / "one")
    two = EnvdTokens.load(tmp_path / "two")
    assert not two.verify("sb", one.issue("sb"))


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        EnvdTokens(b"short")
