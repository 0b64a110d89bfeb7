"""Templates, volumes and publish rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.store import (
    InvalidValue,
    NameTaken,
    NewVolume,
    NotFound,
    SandboxConfig,
    Store,
    TemplateSpec,
    User,
    VolumeInUse,
    VolumeMount,
)


def test_template_crud_scoped_to_user(store: Store, alice: User, bob: User) -> None:
    spec = TemplateSpec(
        cpus=2,
        memory_mb=1024,
        image="python",
        env={"X": "1"},
        init="pip install x",
        volumes=(VolumeMount("cache", "/cache"),),
    )
    tpl = store.create_template(alice.id, "py", spec)
    assert tpl.id.startswith("tpl-")
    assert tpl.spec == spec
    assert store.get_template(alice.id, tpl.id) == tpl
    assert store.list_templates(alice.id) == [tpl]
    assert store.list_templates(bob.id) == []
    with pytest.raises(NotFound):
        store.get_template(bob.id, tpl.id)
    with pytest.raises(NameTaken):
        store.create_template(alice.id, "py", TemplateSpec())
    store.create_template(bob.id, "py", TemplateSpec())  # names are per user
    with pytest.raises(NotFound):
        store.delete_template(bob.id, tpl.id)
    store.delete_template(alice.id, tpl.id)
    with pytest.raises(NotFound):
        store.get_template(alice.id, tpl.id)


def test_template_numbers_from_json(store: Store, alice: User) -> None:
    tpl = store.create_template(
        alice.id,
        "t",
        TemplateSpec(cpus=2.0, memory_mb=256.0),  # type: ignore[arg-type]
    )
    got = store.get_template(alice.id, tpl.id).spec
    assert (got.cpus, got.memory_mb) == (2, 256)
    assert type(got.cpus) is int and type(got.memory_mb) is int
    assert got.image is None
    with pytest.raises(InvalidValue):
        store.create_template(alice.id, "u", TemplateSpec(cpus="2"))  # type: ignore[arg-type]


def test_volume_crud(store: Store, alice: User, bob: User, tmp_path: Path) -> None:
    vol = store.create_volume(alice.id, "data", 100, str(tmp_path / "v.img"))
    assert vol.id.startswith("vol-")
    assert (vol.name, vol.size_mb, vol.attached_to, vol.mount) == ("data", 100, None, None)
    assert type(vol.size_mb) is int
    assert store.get_volume(alice.id, "data") == vol
    assert store.list_volumes(alice.id) == [vol]
    with pytest.raises(NameTaken):
        store.create_volume(alice.id, "data", 5, "/elsewhere")
    with pytest.raises(NotFound):
        store.get_volume(bob.id, "data")
    with pytest.raises(InvalidValue):
        store.create_volume(alice.id, "zero", 0, "/z")
    assert store.delete_volume(alice.id, "data") == vol
    with pytest.raises(NotFound):
        store.delete_volume(alice.id, "data")


def test_volume_in_use_until_sandbox_deleted(store: Store, alice: User, tmp_path: Path) -> None:
    store.create_volume(alice.id, "data", 100, str(tmp_path / "v.img"))
    sb = store.create_sandbox(
        alice.id,
        image="m",
        engine="fake",
        new_volumes=(NewVolume("scratch", 10, str(tmp_path / "s.img")),),
        config=SandboxConfig(
            volumes=(VolumeMount("data", "/data"), VolumeMount("scratch", "/scratch"))
        ),
    )
    data = store.get_volume(alice.id, "data")
    assert (data.attached_to, data.mount) == (sb.id, "/data")
    assert [v.name for v in store.sandbox_volumes(sb.id)] == ["data", "scratch"]
    with pytest.raises(VolumeInUse):
        store.delete_volume(alice.id, "data")
    # a volume is attached to one sandbox at a time
    with pytest.raises(VolumeInUse):
        store.create_sandbox(
            alice.id,
            image="m",
            engine="fake",
            config=SandboxConfig(volumes=(VolumeMount("data", "/d"),)),
        )
    store.delete_sandbox(sb.id)
    assert store.sandbox_volumes(sb.id) == []
    store.delete_volume(alice.id, "data")
    assert [v.name for v in store.list_volumes(alice.id)] == ["scratch"]


def test_volumes_of_other_users_cannot_be_attached(
    store: Store, alice: User, bob: User, tmp_path: Path
) -> None:
    store.create_volume(bob.id, "secret-data", 10, str(tmp_path / "b.img"))
    with pytest.raises(NotFound):
        store.create_sandbox(
            alice.id,
            image="m",
            engine="fake",
            config=SandboxConfig(volumes=(VolumeMount("secret-data", "/x"),)),
        )


def test_two_volumes_on_one_mount_point(store: Store, alice: User) -> None:
    store.create_volume(alice.id, "a", 1, "/a")
    store.create_volume(alice.id, "b", 1, "/b")
    with pytest.raises(InvalidValue, match="/m"):
        store.create_sandbox(
            alice.id,
            image="m",
            engine="fake",
            config=SandboxConfig(volumes=(VolumeMount("a", "/m"), VolumeMount("b", "/m"))),
        )
    assert store.get_volume(alice.id, "a").attached_to is None


def test_publish_rules(store: Store, alice: User) -> None:
    sb = store.create_sandbox(alice.id, image="m", engine="fake")
    other = store.create_sandbox(alice.id, image="m", engine="fake")
    rule = store.add_publish_rule(sb.id, 3000, "app")
    assert (rule.sandbox_id, rule.port, rule.alias) == (sb.id, 3000, "app")
    assert rule.id.startswith("pub-")
    assert store.publish_rule_by_alias("app") == rule
    assert store.list_publish_rules(sb.id) == [rule]
    with pytest.raises(NameTaken, match="port"):
        store.add_publish_rule(sb.id, 3000, "app2")
    with pytest.raises(NameTaken, match="alias"):
        store.add_publish_rule(other.id, 3000, "app")
    with pytest.raises(InvalidValue):
        store.add_publish_rule(sb.id, 70000, "big")
    with pytest.raises(NotFound):
        store.add_publish_rule("sb-missing", 80, "x")
    store.delete_publish_rule(sb.id, 3000)
    assert store.list_publish_rules(sb.id) == []
    with pytest.raises(NotFound):
        store.delete_publish_rule(sb.id, 3000)
