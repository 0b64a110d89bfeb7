"""Labels, ttl and the sandbox as a context manager, through the SDK against a real daemon."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kiln.sdk import AsyncKiln, Kiln, KilnError, NotFound, ValidationError
from kiln.sdk.models import SandboxInfo, parse

from .conftest import unique


def _gone(kiln: Kiln, sandbox_id: str) -> bool:
    try:
        kiln.sandboxes.get(sandbox_id)
    except NotFound:
        return True
    return False


def test_with_block_deletes_the_sandbox(kiln: Kiln) -> None:
    with kiln.sandboxes.create(name=unique("cm")) as sb:
        assert sb.exec(["echo", "inside"]).stdout == "inside\n"
        assert kiln.sandboxes.get(sb.id).id == sb.id
    assert _gone(kiln, sb.id)


def test_with_block_deletes_it_when_the_block_raises(kiln: Kiln) -> None:
    with pytest.raises(RuntimeError, match="boom"), kiln.sandboxes.create() as sb:
        raise RuntimeError("boom")
    assert _gone(kiln, sb.id)


def test_keep_true_survives_the_block(kiln: Kiln) -> None:
    with kiln.sandboxes.create(name=unique("kept"), keep=True) as sb:
        pass
    try:
        assert kiln.sandboxes.get(sb.id).name == sb.name
    finally:
        kiln.sandboxes.delete(sb.id)


def test_a_sandbox_deleted_inside_the_block_is_fine_on_exit(kiln: Kiln) -> None:
    with kiln.sandboxes.create() as sb:
        sb.delete()
    assert _gone(kiln, sb.id)


def test_a_failed_delete_on_exit_rides_on_the_blocks_own_error(kiln: Kiln) -> None:
    sb = kiln.sandboxes.create()
    # The same sandbox through a client whose key the daemon refuses: its delete fails.
    with Kiln(kiln.url, "kiln_wrong-key") as other:
        stranger = type(sb)._wrap(other, sb)
        with pytest.raises(KilnError), stranger:  # nothing else went wrong: it shows
            pass
        with pytest.raises(ValueError, match="mine") as caught, stranger:
            raise ValueError("mine")
        assert any("deleting sandbox" in note for note in caught.value.__notes__)
    kiln.sandboxes.delete(sb.id)


def test_labels_ttl_and_filtered_list(kiln: Kiln) -> None:
    tag = unique("run")
    a = kiln.sandboxes.create(labels={"run": tag, "role": "web"}, ttl_s=3600, keep=True)
    b = kiln.sandboxes.create(labels={"run": tag, "role": "db"}, on_expire="stop")
    try:
        assert a.labels == {"run": tag, "role": "web"}
        assert a.expires_at is not None and a.on_expire == "destroy"
        left = a.expires_at - datetime.now(UTC)
        assert timedelta(minutes=59) < left <= timedelta(hours=1)
        assert (b.expires_at, b.on_expire) == (None, "stop")

        assert {s.id for s in kiln.sandboxes.list(labels={"run": tag})} == {a.id, b.id}
        assert [s.id for s in kiln.sandboxes.list(labels={"run": tag, "role": "db"})] == [b.id]
        assert kiln.sandboxes.list(labels={"run": "nobody"}) == []

        a = a.update(labels={"run": tag}, ttl_s=None)
        assert (a.labels, a.expires_at) == ({"run": tag}, None)
        b = kiln.sandboxes.ref(b.name).update(ttl_s=60)
        assert b.expires_at is not None and b.labels == {"run": tag, "role": "db"}
        assert b.update(name=unique("renamed")).expires_at == b.expires_at  # ttl untouched
    finally:
        for sb in (a, b):
            kiln.sandboxes.delete(sb.id)


def test_bad_lifecycle_values_are_validation_errors(kiln: Kiln) -> None:
    with pytest.raises(ValidationError, match="ttl_s"):
        kiln.sandboxes.create(ttl_s=-1)
    with pytest.raises(ValidationError, match="labels"):
        kiln.sandboxes.create(labels={"": "x"})


async def test_async_with_deletes_and_keep_keeps(akiln: AsyncKiln) -> None:
    tag = unique("async")
    async with await akiln.sandboxes.create(labels={"t": tag}) as sb:
        assert (await sb.exec(["true"])).exit_code == 0
        assert [s.id for s in await akiln.sandboxes.list(labels={"t": tag})] == [sb.id]
    assert await akiln.sandboxes.list(labels={"t": tag}) == []

    async with await akiln.sandboxes.create(keep=True, ttl_s=30) as kept:
        await kept.delete()  # gone before the exit: no error either way
    kept2 = await akiln.sandboxes.create(keep=True)
    async with kept2:
        pass
    assert (await akiln.sandboxes.get(kept2.id)).id == kept2.id
    updated = await kept2.update(labels={"a": "b"}, ttl_s=5)
    assert updated.labels == {"a": "b"} and updated.expires_at is not None
    await kept2.delete()


def parse_sandbox(data: object) -> SandboxInfo:
    return parse(SandboxInfo, data, "sandbox")


def test_parse_sandbox_lifecycle_fields() -> None:
    base = {"id": "sb-1", "name": "n", "status": "running"}
    old = parse_sandbox(base)  # a daemon from before labels
    assert (old.labels, old.expires_at, old.on_expire) == ({}, None, "destroy")
    new = parse_sandbox(
        {**base, "labels": {"a": "b"}, "expires_at": "2030-01-01T00:00:00Z", "on_expire": "stop"}
    )
    assert new.labels == {"a": "b"} and new.on_expire == "stop"
    assert new.expires_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert new.to_dict()["labels"] == {"a": "b"}
    assert new.to_dict()["expires_at"] == "2030-01-01T00:00:00+00:00"
    with pytest.raises(KilnError, match="labels"):
        parse_sandbox({**base, "labels": {"a": 1}})


def test_fork_returns_the_copy(kiln: Kiln) -> None:
    with kiln.sandboxes.create(name=unique("src"), labels={"job": "fork"}) as sb:
        name = unique("copy")
        with sb.fork(name=name) as copy:
            assert (copy.name, copy.labels, copy.engine) == (name, {"job": "fork"}, sb.engine)
            assert copy.id != sb.id and kiln.sandboxes.get(name).id == copy.id
            with pytest.raises(KilnError) as info:
                sb.fork(name=name)
            assert info.value.status_code == 409
        with pytest.raises(NotFound):
            kiln.sandboxes.fork(unique("nobody"))


async def test_async_fork(akiln: AsyncKiln) -> None:
    async with await akiln.sandboxes.create(name=unique("asrc")) as sb, await sb.fork() as copy:
        assert copy.name == copy.id != sb.id


def test_save_image_then_create_from_it(kiln: Kiln) -> None:
    name = unique("img")
    with kiln.sandboxes.create(name=unique("src"), memory_mb=256) as sb:
        sb.files.write("saved.txt", b"in the image\n")
        saved = sb.save_image(name)
        assert (saved.name, saved.source_id, saved.memory_mb) == (name, sb.id, 256)
        with pytest.raises(KilnError) as info:
            sb.save_image(name)
        assert info.value.status_code == 409
    try:
        assert [s.name for s in kiln.saved_images.list()] == [name]
        assert kiln.saved_images.get(name).id == saved.id
        with kiln.sandboxes.create(saved_image=name) as copy:
            assert copy.memory_mb == 256
            assert copy.files.read("saved.txt").data == b"in the image\n"
        with pytest.raises(ValidationError):
            kiln.sandboxes.create(saved_image=name, env={"A": "b"})
    finally:
        kiln.saved_images.delete(name)
    with pytest.raises(NotFound):
        kiln.saved_images.get(name)
    with pytest.raises(NotFound):
        kiln.sandboxes.create(saved_image=name)


async def test_async_save_image(akiln: AsyncKiln) -> None:
    name = unique("aimg")
    async with await akiln.sandboxes.create(name=unique("asrc")) as sb:
        saved = await sb.save_image(name)
        async with await akiln.sandboxes.create(saved_image=name) as copy:
            assert copy.id != sb.id and saved.source_id == sb.id
    await akiln.saved_images.delete(name)
    assert await akiln.saved_images.list() == []
