from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kiln.store import (
    API_KEY_PREFIX,
    InvalidValue,
    NameTaken,
    NotFound,
    QuotaExceeded,
    Quotas,
    Store,
    User,
    UserHasSandboxes,
)

from .conftest import RawSql


def test_create_user_returns_key_once_and_stores_only_its_hash(
    store: Store, raw_sql: RawSql
) -> None:
    user, key = store.create_user("alice", admin=True, quotas=Quotas(max_sandboxes=3))
    assert key.startswith(API_KEY_PREFIX)
    assert len(key) >= len(API_KEY_PREFIX) + 43  # 32 random bytes, base64
    assert user.is_admin is True
    assert user.quotas == Quotas(max_sandboxes=3)
    assert store.user_by_key(key) == user

    rows = raw_sql("SELECT * FROM users")
    flat = repr(rows)
    assert key not in flat
    assert hashlib.sha256(key.encode()).hexdigest() in flat


def test_keys_are_unique_and_wrong_keys_fail(store: Store) -> None:
    _, k1 = store.create_user("a")
    _, k2 = store.create_user("b")
    assert k1 != k2
    assert store.user_by_key(k1 + "x") is None
    assert store.user_by_key("") is None
    assert store.user_by_key("not-a-kiln-key") is None


def test_duplicate_user_name(store: Store, alice: User) -> None:
    with pytest.raises(NameTaken):
        store.create_user("alice")


def test_rotate_key_invalidates_old(store: Store) -> None:
    user, old = store.create_user("alice")
    new = store.rotate_key(user.id)
    assert new != old
    assert store.user_by_key(old) is None
    assert store.user_by_key(new) == user
    with pytest.raises(NotFound):
        store.rotate_key("u-nobody")


def test_list_get_and_types(store: Store) -> None:
    a, _ = store.create_user("zed", quotas=Quotas(max_cpus=2, max_memory_mb=1024))
    b, _ = store.create_user("amy", admin=True)
    assert [u.name for u in store.list_users()] == ["amy", "zed"]
    got = store.get_user(a.id)
    assert got == a
    assert type(got.is_admin) is bool
    assert type(got.quotas.max_cpus) is int
    assert got.quotas.max_sandboxes is None
    assert store.user_by_name("amy") == b
    with pytest.raises(NotFound):
        store.get_user("u-missing")


def test_quota_values_from_json_floats_are_ints(store: Store) -> None:
    user, _ = store.create_user("f", quotas=Quotas(max_sandboxes=2.0))  # type: ignore[arg-type]
    assert store.get_user(user.id).quotas.max_sandboxes == 2
    assert type(store.get_user(user.id).quotas.max_sandboxes) is int
    with pytest.raises(InvalidValue):
        store.create_user("g", quotas=Quotas(max_cpus=1.5))  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        store.create_user("h", quotas=Quotas(max_cpus=-1))


def test_set_quotas(store: Store, alice: User) -> None:
    updated = store.set_quotas(alice.id, Quotas(max_sandboxes=1))
    assert updated.quotas.max_sandboxes == 1
    assert store.get_user(alice.id).quotas == Quotas(max_sandboxes=1)


def test_check_quota(store: Store) -> None:
    user, _ = store.create_user("q", quotas=Quotas(max_sandboxes=1, max_cpus=2, max_memory_mb=1024))
    store.check_quota(user, 2, 1024)
    with pytest.raises(QuotaExceeded, match="cpus"):
        store.check_quota(user, 3, 512)
    with pytest.raises(QuotaExceeded, match="memory_mb"):
        store.check_quota(user, 1, 2048)
    store.create_sandbox(user.id, image="minimal", engine="fake")
    with pytest.raises(QuotaExceeded, match="sandboxes"):
        store.check_quota(user, 1, 512)
    # create_sandbox enforces the same limit inside its transaction
    with pytest.raises(QuotaExceeded):
        store.create_sandbox(user.id, image="minimal", engine="fake")
    assert store.count_sandboxes(user.id) == 1


def test_delete_user_cascades_but_not_with_live_sandboxes(store: Store, tmp_path: Path) -> None:
    user, key = store.create_user("gone")
    sb = store.create_sandbox(user.id, image="minimal", engine="fake")
    store.put_secret(user.id, "S", "v")
    store.create_volume(user.id, "data", 10, str(tmp_path / "data.img"))
    with pytest.raises(UserHasSandboxes):
        store.delete_user(user.id)
    store.delete_sandbox(sb.id)
    store.delete_user(user.id)
    assert store.user_by_key(key) is None
    assert store.list_secrets(user.id) == []
    assert store.list_volumes(user.id) == []
    with pytest.raises(NotFound):
        store.get_sandbox(sb.id, include_deleted=True)
    with pytest.raises(NotFound):
        store.delete_user(user.id)
    assert store.integrity_check() == []
