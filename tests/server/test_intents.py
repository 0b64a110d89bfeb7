"""The intent files of interrupted creates and destroys (kiln.server.intents).

What a restart does with them is tested end to end by the crash-point tests
(tests/server/vm/test_crash_points.py).
"""

from __future__ import annotations

from pathlib import Path

from kiln.server.intents import Intent, Intents


def test_begin_end_pending(tmp_path: Path) -> None:
    intents = Intents(tmp_path / "intents")
    assert intents.pending() == []
    create = Intent("sb-000000000001", "create", "u-1", ("data",))
    intents.begin(create)
    intents.begin(Intent("sb-000000000002", "destroy", "u-1"))
    assert intents.pending() == [create, Intent("sb-000000000002", "destroy", "u-1")]
    intents.end("sb-000000000002")
    intents.end("sb-000000000002")  # idempotent
    assert intents.pending() == [create]
    # A destroy replaces the sandbox's earlier intent.
    intents.begin(Intent("sb-000000000001", "destroy", "u-1"))
    assert [i.op for i in intents.pending()] == ["destroy"]
    assert (tmp_path / "intents").stat().st_mode & 0o777 == 0o700


def test_an_unreadable_intent_is_dropped(tmp_path: Path) -> None:
    intents = Intents(tmp_path)
    (tmp_path / "sb-000000000003.json").write_text('{"op": "create"')
    assert intents.pending() == []
    assert not (tmp_path / "sb-000000000003.json").exists()
