"""A writer killed with SIGKILL mid-work loses no committed row and leaves no damage
(on either backend: ``store_target`` is a SQLite file or a PostgreSQL database)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from kiln.store import SecretBox, Store

SRC = Path(__file__).resolve().parents[2] / "src"

WRITER = r"""
import sys
from kiln.store import SandboxConfig, SecretBox, Store

db, key, round_ = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store.open(db, secret_box=SecretBox(key))
try:
    user = store.user_by_name("crash")
except Exception:
    user, _ = store.create_user("crash")
i = 0
while True:
    name = f"r{round_}-{i}"
    sb = store.create_sandbox(
        user.id, name=name, image="m", engine="fake", enforce_quota=False,
        config=SandboxConfig(env={"I": str(i)}), engine_state={"i": i, "blob": "x" * 2000},
    )
    store.touch(sb.id, 2_000_000_000.0 + i)
    store.put_secret(user.id, name, f"value-{i}")
    if i % 3 == 0:
        store.delete_sandbox(sb.id)
    # acknowledged only after every write of this round trip committed
    print(sb.id, name, i, flush=True)
    i += 1
"""


def _run_and_kill(db: str, key: Path, round_: int, acks: int) -> list[tuple[str, str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(key), str(round_)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
        text=True,
    )
    assert proc.stdout is not None
    done: list[tuple[str, str, int]] = []
    try:
        while len(done) < acks:
            line = proc.stdout.readline()
            assert line, f"writer exited early with {proc.poll()}"
            sid, name, i = line.split()
            done.append((sid, name, int(i)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return done


def test_sigkill_loses_no_acknowledged_row(tmp_path: Path, store_target: str) -> None:
    db, key = store_target, tmp_path / "secret.key"
    acknowledged: list[tuple[str, str, int]] = []
    for round_ in range(3):
        acknowledged += _run_and_kill(db, key, round_, acks=150 + 50 * round_)

    with Store.open(db, secret_box=SecretBox(key)) as store:
        assert store.integrity_check() == []
        user = store.user_by_name("crash")
        for sid, name, i in acknowledged:
            sb = store.get_sandbox(sid, include_deleted=True)
            assert sb.name == name
            assert sb.live == (i % 3 != 0)
            assert sb.engine_state is not None and sb.engine_state["i"] == i
            assert sb.config.env == {"I": str(i)}
            assert sb.last_active_at == 2_000_000_000.0 + i
        values = store.get_secret_values(user.id, [name for _, name, _ in acknowledged])
        assert values == {name: f"value-{i}" for _, name, i in acknowledged}
