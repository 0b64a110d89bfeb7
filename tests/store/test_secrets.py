from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.store import NotFound, SecretBox, SecretKeyError, Store, User

from .conftest import RawSql


def test_put_list_get_delete(store: Store, alice: User, bob: User) -> None:
    info = store.put_secret(alice.id, "TOKEN", "s3cret")
    assert info.name == "TOKEN" and info.created_at == info.updated_at
    store.put_secret(alice.id, "OTHER", "x")
    again = store.put_secret(alice.id, "TOKEN", "rotated")  # create or replace
    assert again.created_at == info.created_at and again.updated_at > info.updated_at
    listed = store.list_secrets(alice.id)
    assert [s.name for s in listed] == ["OTHER", "TOKEN"]
    assert "rotated" not in repr(listed)
    assert store.get_secret_values(alice.id, ["TOKEN", "OTHER"]) == {
        "TOKEN": "rotated",
        "OTHER": "x",
    }
    assert store.get_secret_values(alice.id, []) == {}
    assert store.list_secrets(bob.id) == []
    with pytest.raises(NotFound, match="TOKEN"):
        store.get_secret_values(bob.id, ["TOKEN"])
    with pytest.raises(NotFound, match=r"NOPE.*ALSO"):
        store.get_secret_values(alice.id, ["TOKEN", "NOPE", "ALSO"])
    store.delete_secret(alice.id, "TOKEN")
    with pytest.raises(NotFound):
        store.delete_secret(alice.id, "TOKEN")


def test_values_are_encrypted_at_rest(store: Store, alice: User, raw_sql: RawSql) -> None:
    store.put_secret(alice.id, "K", "plaintext-marker-\u2713")
    [(blob,)] = raw_sql("SELECT ciphertext FROM secrets")
    assert bytes(blob).startswith(b"age-encryption.org/v1")
    assert b"plaintext-marker" not in bytes(blob)


def test_sqlite_file_holds_no_plaintext(sqlite_store: Store) -> None:
    alice = sqlite_store.create_user("alice")[0]
    sqlite_store.put_secret(alice.id, "K", "plaintext-marker-\u2713")
    path = sqlite_store.path
    raw = Path(path).read_bytes() + Path(path + "-wal").read_bytes()
    assert b"age-encryption.org/v1" in raw
    assert b"plaintext-marker" not in raw


def test_ciphertext_moved_to_another_user_is_refused(
    store: Store, alice: User, bob: User, raw_sql: RawSql
) -> None:
    store.put_secret(alice.id, "K", "alice-only")
    store.put_secret(bob.id, "K", "bob")
    raw_sql(
        "UPDATE secrets SET ciphertext = (SELECT ciphertext FROM secrets WHERE user_id = ?)"
        " WHERE user_id = ?",
        (alice.id, bob.id),
    )
    with pytest.raises(SecretKeyError, match="not sealed"):
        store.get_secret_values(bob.id, ["K"])


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "k" / "secret.key"
    box = SecretBox(path)
    assert not path.exists()  # no I/O before first use
    ct = box.encrypt(b"hello")
    assert (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert "# public key: age1" in text and "AGE-SECRET-KEY-" in text
    assert SecretBox(path).decrypt(ct) == b"hello"
    assert SecretBox(path).public_key == box.public_key
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temp file left


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    SecretBox(path).encrypt(b"x")
    os.chmod(path, 0o640)
    with pytest.raises(SecretKeyError, match="chmod 600"):
        SecretBox(path).encrypt(b"x")


def test_garbage_key_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"AGE-SECRET-KEY-1NOTAKEY\n")
    os.close(fd)
    with pytest.raises(SecretKeyError, match="not a valid age identity"):
        SecretBox(path).encrypt(b"x")
    os.truncate(path, 0)
    with pytest.raises(SecretKeyError, match="exactly one"):
        SecretBox(path).encrypt(b"x")


def test_replaced_key_cannot_decrypt(tmp_path: Path, alice_store: tuple[Store, User]) -> None:
    store, alice = alice_store
    store.put_secret(alice.id, "K", "v")
    key = tmp_path / "keys" / "secret.key"
    key.unlink()
    path = store.path
    store.close()
    with (
        Store.open(path, secret_box=SecretBox(key)) as reopened,
        pytest.raises(SecretKeyError, match="cannot decrypt"),
    ):
        reopened.get_secret_values(alice.id, ["K"])


def test_secret_key_is_claimed_by_the_first_daemon(store: Store, alice: User) -> None:
    assert store.claim_secret_key("age1first")
    assert store.claim_secret_key("age1first")
    # Nothing sealed yet: a new key is adopted (nothing becomes unreadable).
    assert store.claim_secret_key("age1second")
    store.put_secret(alice.id, "K", "v")
    assert not store.claim_secret_key("age1first")
    assert store.claim_secret_key("age1second")
    store.delete_secret(alice.id, "K")
    assert store.claim_secret_key("age1first")


def test_store_without_secret_box(tmp_path: Path) -> None:
    with Store.open(tmp_path / "db") as s:
        user, _ = s.create_user("u")
        with pytest.raises(SecretKeyError, match="no secret key"):
            s.put_secret(user.id, "K", "v")


@pytest.fixture
def alice_store(tmp_path: Path, box: SecretBox) -> Iterator[tuple[Store, User]]:
    with Store.open(tmp_path / "kiln.db", secret_box=box) as store:
        yield store, store.create_user("alice")[0]
