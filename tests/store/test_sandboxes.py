from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from kiln.engine import Status, Thermal
from kiln.store import (
    InvalidValue,
    NameTaken,
    NewVolume,
    NotFound,
    SandboxConfig,
    SchemaError,
    Store,
    StoreError,
    User,
    VolumeMount,
    rfc3339,
)

from .conftest import RawSql


def test_create_and_read_back_with_right_types(store: Store, alice: User) -> None:
    config = SandboxConfig(
        env={"A": "1", "UNICODE": "héllo ✓"},
        init="echo hi\n",
        secrets=("TOKEN",),
    )
    sb = store.create_sandbox(
        alice.id,
        name="web",
        cpus=2,
        memory_mb=1024,
        image="python",
        engine="qemu",
        keep_hot=True,
        config=config,
        ip="10.0.0.5",
        engine_state={"pid": 4242, "ratio": 0.5, "disk": "/x", "flags": [1, 2.0, True]},
    )
    assert sb.id.startswith("sb-") and len(sb.id) == 3 + 12
    got = store.get_sandbox(sb.id)
    assert got == sb
    assert type(got.cpus) is int and got.cpus == 2
    assert type(got.memory_mb) is int
    assert type(got.keep_hot) is bool and got.keep_hot is True
    assert got.status is Status.RUNNING and got.thermal is Thermal.HOT
    assert got.config == config
    assert got.engine_state == {"pid": 4242, "ratio": 0.5, "disk": "/x", "flags": [1, 2.0, True]}
    assert got.engine_state is not None
    assert type(got.engine_state["pid"]) is int
    assert type(got.engine_state["ratio"]) is float
    assert [type(x) for x in got.engine_state["flags"]] == [int, float, bool]
    assert got.live and got.deleted_at is None
    assert got.created_at == got.last_active_at
    assert rfc3339(1700000000.5) == "2023-11-14T22:13:20.500000Z"


def test_counts_from_json_floats_become_ints(store: Store, alice: User) -> None:
    sb = store.create_sandbox(
        alice.id,
        image="minimal",
        engine="fake",
        cpus=2.0,  # type: ignore[arg-type]  # as a JSON body may deliver it
        memory_mb=512.0,  # type: ignore[arg-type]
    )
    got = store.get_sandbox(sb.id)
    assert (got.cpus, got.memory_mb) == (2, 512)
    assert type(got.cpus) is int and type(got.memory_mb) is int
    with pytest.raises(InvalidValue):
        store.create_sandbox(alice.id, image="m", engine="fake", cpus=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        store.create_sandbox(alice.id, image="m", engine="fake", cpus=True)


def test_bad_stored_values_are_schema_errors(store: Store, alice: User, raw_sql: RawSql) -> None:
    sb = store.create_sandbox(alice.id, image="m", engine="fake")
    raw_sql("UPDATE sandboxes SET spec = ? WHERE id = ?", ('{"env": {"A": 1}}', sb.id))
    with pytest.raises(SchemaError, match="env"):
        store.get_sandbox(sb.id)


def test_strict_tables_refuse_wrong_types(sqlite_store: Store) -> None:
    # SQLite only: it would store 2.5 in a column declared INTEGER unless STRICT
    # (PostgreSQL's BIGINT is typed anyway).
    alice = sqlite_store.create_user("alice")[0]
    sb = sqlite_store.create_sandbox(alice.id, image="m", engine="fake")
    conn = sqlite3.connect(sqlite_store.path)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE sandboxes SET cpus = 2.5 WHERE id = ?", (sb.id,))
    conn.close()


def test_name_defaults_to_id_and_is_unique_per_user_among_live(
    store: Store, alice: User, bob: User
) -> None:
    sb = store.create_sandbox(alice.id, image="m", engine="fake")
    assert sb.name == sb.id
    first = store.create_sandbox(alice.id, name="dev", image="m", engine="fake")
    with pytest.raises(NameTaken):
        store.create_sandbox(alice.id, name="dev", image="m", engine="fake")
    store.create_sandbox(bob.id, name="dev", image="m", engine="fake")  # other user: fine
    store.delete_sandbox(first.id)
    again = store.create_sandbox(alice.id, name="dev", image="m", engine="fake")
    assert again.id != first.id
    assert store.get_sandbox(first.id, include_deleted=True).name == "dev"


def test_find_by_id_or_name_scoped_to_user(store: Store, alice: User, bob: User) -> None:
    sb = store.create_sandbox(alice.id, name="web", image="m", engine="fake")
    assert store.find_sandbox(alice.id, "web") == sb
    assert store.find_sandbox(alice.id, sb.id) == sb
    with pytest.raises(NotFound):
        store.find_sandbox(bob.id, "web")
    with pytest.raises(NotFound):
        store.find_sandbox(bob.id, sb.id)
    store.delete_sandbox(sb.id)
    with pytest.raises(NotFound):
        store.find_sandbox(alice.id, "web")


def test_rename(store: Store, alice: User) -> None:
    a = store.create_sandbox(alice.id, name="a", image="m", engine="fake")
    store.create_sandbox(alice.id, name="b", image="m", engine="fake")
    with pytest.raises(NameTaken):
        store.rename_sandbox(a.id, "b")
    assert store.rename_sandbox(a.id, "a").name == "a"
    renamed = store.rename_sandbox(a.id, "c")
    assert renamed.name == "c" and renamed.id == a.id
    assert store.find_sandbox(alice.id, "c").id == a.id
    with pytest.raises(NotFound):
        store.rename_sandbox("sb-missing", "x")


def test_update_fields_and_engine_state(store: Store, alice: User) -> None:
    sb = store.create_sandbox(alice.id, image="m", engine="fake", ip="10.0.0.2")
    up = store.update_sandbox(sb.id, thermal=Thermal.WARM)
    assert up.thermal is Thermal.WARM and up.ip == "10.0.0.2" and up.status is Status.RUNNING
    up = store.update_sandbox(sb.id, status=Status.STOPPED, thermal=Thermal.COLD, ip=None)
    assert (up.status, up.thermal, up.ip) == (Status.STOPPED, Thermal.COLD, None)
    up = store.update_sandbox(sb.id, keep_hot=True)
    assert up.keep_hot is True
    store.set_engine_state(sb.id, {"snapshot": "/s/1", "gen": 3})
    assert store.get_sandbox(sb.id).engine_state == {"snapshot": "/s/1", "gen": 3}
    store.set_engine_state(sb.id, None)
    assert store.get_sandbox(sb.id).engine_state is None
    with pytest.raises(InvalidValue):
        store.set_engine_state(sb.id, {"x": object()})
    with pytest.raises(InvalidValue):
        store.set_engine_state(sb.id, {"x": float("nan")})
    assert store.update_sandbox(sb.id) == store.get_sandbox(sb.id)
    store.delete_sandbox(sb.id)
    with pytest.raises(NotFound):
        store.update_sandbox(sb.id, thermal=Thermal.HOT)


def test_touch_only_moves_forward(store: Store, alice: User) -> None:
    sb = store.create_sandbox(alice.id, image="m", engine="fake")
    store.touch(sb.id, sb.created_at + 100)
    store.touch(sb.id, sb.created_at + 50)
    assert store.get_sandbox(sb.id).last_active_at == sb.created_at + 100
    store.touch(sb.id)  # the store's clock: later than creation, earlier than +100
    assert store.get_sandbox(sb.id).last_active_at == sb.created_at + 100
    with pytest.raises(NotFound):
        store.touch("sb-missing")


def test_lists_and_counts(store: Store, alice: User, bob: User) -> None:
    a1 = store.create_sandbox(alice.id, image="m", engine="qemu")
    a2 = store.create_sandbox(alice.id, image="m", engine="docker")
    b1 = store.create_sandbox(bob.id, image="m", engine="qemu")
    store.delete_sandbox(a2.id)
    assert [s.id for s in store.list_sandboxes(alice.id)] == [a1.id]
    assert [s.id for s in store.list_live_sandboxes()] == [a1.id, b1.id]
    assert [s.id for s in store.list_live_sandboxes("qemu")] == [a1.id, b1.id]
    assert store.list_live_sandboxes("docker") == []
    assert store.count_sandboxes(alice.id) == 1
    assert store.count_sandboxes() == 2


def test_delete_is_soft_and_frees_name_volumes_and_rules(
    store: Store, alice: User, tmp_path: Path
) -> None:
    store.create_volume(alice.id, "data", 64, str(tmp_path / "data.img"))
    sb = store.create_sandbox(
        alice.id,
        image="m",
        engine="fake",
        config=SandboxConfig(volumes=(VolumeMount("data", "/data"),)),
    )
    store.add_publish_rule(sb.id, 3000, "myapp")
    gone = store.delete_sandbox(sb.id)
    assert not gone.live and gone.deleted_at is not None
    with pytest.raises(NotFound):
        store.get_sandbox(sb.id)
    assert store.get_volume(alice.id, "data").attached_to is None
    with pytest.raises(NotFound):
        store.publish_rule_by_alias("myapp")
    with pytest.raises(NotFound):
        store.delete_sandbox(sb.id)


def test_failed_create_leaves_nothing(store: Store, alice: User, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        store.create_sandbox(
            alice.id,
            name="x",
            image="m",
            engine="fake",
            new_volumes=(NewVolume("fresh", 10, str(tmp_path / "f.img")),),
            config=SandboxConfig(
                volumes=(VolumeMount("fresh", "/f"), VolumeMount("missing", "/m"))
            ),
        )
    assert store.list_sandboxes(alice.id) == []
    assert store.list_volumes(alice.id) == []
    with pytest.raises(NotFound):
        store.create_sandbox("u-nobody", image="m", engine="fake")


def test_spec_json_is_plain_json(store: Store, alice: User, raw_sql: RawSql) -> None:
    sb = store.create_sandbox(
        alice.id,
        image="m",
        engine="fake",
        config=SandboxConfig(env={"K": "V"}, volumes=(), secrets=("S",)),
    )
    [(spec,)] = raw_sql("SELECT spec FROM sandboxes WHERE id = ?", (sb.id,))
    assert json.loads(spec) == {
        "env": {"K": "V"},
        "init": None,
        "volumes": [],
        "secrets": ["S"],
        "runtime": None,
        "network": None,
        "user": None,
        "workdir": None,
        "template": None,
        "idempotency": None,
    }


def test_closed_store_raises(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "c.db")
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_users()
