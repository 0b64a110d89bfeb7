"""Secret values encrypted at rest with age (X25519), through ``pyrage``.

The identity (private key) lives in one file, created on first use with mode
0600 in the format ``age-keygen`` writes, so the standard ``age`` tool can
decrypt a stored value by hand. A key file that group or others can read is
refused rather than silently tightened: if it leaked, the operator should know.

Each ciphertext binds the value to its owner and name (they are encrypted
together and checked on decrypt), so copying one user's ciphertext into another
row of the database does not hand the value to someone else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pyrage
from pyrage import x25519

from .errors import SecretKeyError

_MAGIC = b"kiln-secret-v1\x00"


class SecretBox:
    """Encrypts and decrypts secret values with one age identity kept in ``key_path``.

    Construction does no I/O; the key file is read (or created) on first use.
    """

    def __init__(self, key_path: str | os.PathLike[str]) -> None:
        self.key_path = Path(key_path)
        self._lock = threading.Lock()
        self._identity: x25519.Identity | None = None
        self._recipient: x25519.Recipient | None = None

    # --- public API ---------------------------------------------------------------

    def encrypt(self, plaintext: bytes) -> bytes:
        _identity, recipient = self._keys()
        try:
            return bytes(pyrage.encrypt(plaintext, [recipient]))
        except pyrage.EncryptError as exc:  # pragma: no cover - only on a broken library
            raise SecretKeyError(f"encryption failed: {exc}") from exc

    def decrypt(self, ciphertext: bytes) -> bytes:
        identity, _recipient = self._keys()
        try:
            return bytes(pyrage.decrypt(ciphertext, [identity]))
        except pyrage.DecryptError as exc:
            raise SecretKeyError(
                f"cannot decrypt a stored secret with the key in {self.key_path} "
                f"(was the key file replaced?): {exc}"
            ) from exc

    def seal(self, owner: str, name: str, value: str) -> bytes:
        """Encrypt ``value`` bound to ``owner`` and ``name``."""
        return self.encrypt(_bind(owner, name) + value.encode("utf-8"))

    def open(self, owner: str, name: str, ciphertext: bytes) -> str:
        """Decrypt a value sealed for ``owner``/``name``; refuse one sealed for another."""
        plaintext = self.decrypt(ciphertext)
        header = _bind(owner, name)
        if not plaintext.startswith(header):
            raise SecretKeyError(f"stored secret {name!r} was not sealed for this user and name")
        return plaintext[len(header) :].decode("utf-8")

    @property
    def public_key(self) -> str:
        """The ``age1…`` recipient string (creates the key file if needed)."""
        return str(self._keys()[1])

    # --- key file -------------------------------------------------------------------

    def _keys(self) -> tuple[x25519.Identity, x25519.Recipient]:
        with self._lock:
            if self._identity is None or self._recipient is None:
                identity = self._load() if self.key_path.exists() else self._create()
                self._identity, self._recipient = identity, identity.to_public()
            return self._identity, self._recipient

    def _load(self) -> x25519.Identity:
        path = self.key_path
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise SecretKeyError(f"secret key {path} is not a regular file")
            if st.st_mode & 0o077:
                raise SecretKeyError(
                    f"secret key {path} is readable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
                )
            text = path.read_text("ascii")
        except OSError as exc:
            raise SecretKeyError(f"cannot read secret key {path}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise SecretKeyError(f"secret key {path} is not an age identity file") from exc
        keys = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if len(keys) != 1 or not keys[0].startswith("AGE-SECRET-KEY-"):
            raise SecretKeyError(f"secret key {path} must hold exactly one AGE-SECRET-KEY line")
        try:
            return x25519.Identity.from_str(keys[0])
        except pyrage.IdentityError as exc:
            raise SecretKeyError(f"secret key {path} is not a valid age identity: {exc}") from exc

    def _create(self) -> x25519.Identity:
        """Write a new identity atomically: a partial file never appears at ``key_path``."""
        path = self.key_path
        identity = x25519.Identity.generate()
        created = datetime.now(UTC).replace(microsecond=0).isoformat()
        text = (f"# created: {created}\n# public key: {identity.to_public()}\n{identity}\n").encode(
            "ascii"
        )
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process created the key first
            except FileExistsError:
                return self._load()
        except OSError as exc:
            raise SecretKeyError(f"cannot create secret key {path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return identity


def _bind(owner: str, name: str) -> bytes:
    return _MAGIC + owner.encode("utf-8") + b"\x00" + name.encode("utf-8") + b"\x00"
