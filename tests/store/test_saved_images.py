"""Saved images: names unique per owner, invisible to other users, kept on reopen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.store import InvalidValue, NameTaken, NotFound, SandboxConfig, SecretBox, Store, User


def _fields(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "image_id": "si-0001",
        "engine": "qemu",
        "tier": "minimal",
        "cpus": 2,
        "memory_mb": 256,
        "size_bytes": 1 << 20,
        "memory": True,
        "source_id": "sb-1",
        "config": SandboxConfig(env={"A": "b"}, init="echo hi", runtime=None),
    }
    return {**base, **over}


def test_saved_images_are_their_owners(store: Store, alice: User, bob: User) -> None:
    img = store.create_saved_image(alice.id, "web", **_fields())
    assert (img.id, img.name, img.user_id, img.tier, img.memory) == (
        "si-0001",
        "web",
        alice.id,
        "minimal",
        True,
    )
    assert img.config.env == {"A": "b"} and img.config.init == "echo hi"
    assert store.get_saved_image(alice.id, "web") == img
    assert store.list_saved_images(alice.id) == [img]
    assert store.list_saved_images(bob.id) == []
    with pytest.raises(NotFound):
        store.get_saved_image(bob.id, "web")
    with pytest.raises(NameTaken):
        store.create_saved_image(alice.id, "web", **_fields(image_id="si-0002"))
    # Another owner may use the name.
    theirs = store.create_saved_image(bob.id, "web", **_fields(image_id="si-0003", memory=False))
    assert theirs.memory is False and store.list_saved_images(bob.id) == [theirs]
    with pytest.raises(NotFound):
        store.delete_saved_image(bob.id, "nope")
    assert store.delete_saved_image(alice.id, "web") == img
    with pytest.raises(NotFound):
        store.get_saved_image(alice.id, "web")
    assert store.get_saved_image(bob.id, "web") == theirs


def test_bad_values_are_refused(store: Store, alice: User) -> None:
    with pytest.raises(InvalidValue):
        store.create_saved_image(alice.id, "x", **_fields(cpus=1.5))
    with pytest.raises(NotFound):
        store.create_saved_image("u-nobody", "x", **_fields())
    assert store.list_saved_images(alice.id) == []


def test_saved_images_survive_a_reopen(tmp_path: Path, box: SecretBox) -> None:
    with Store.open(tmp_path / "again.db", secret_box=box) as first:
        user, _ = first.create_user("carol")
        img = first.create_saved_image(user.id, "keep", **_fields())
    with Store.open(tmp_path / "again.db", secret_box=box) as second:
        assert second.list_saved_images(user.id) == [img]
