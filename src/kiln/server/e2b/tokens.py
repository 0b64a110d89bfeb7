"""Per-sandbox envd access tokens, derived from a daemon key rather than stored.

E2B's SDK authenticates every envd call with ``X-Access-Token``, a token the
control plane hands out with the sandbox. An HMAC of the sandbox id under a key
only the daemon holds gives every sandbox its own token without a table to
keep, migrate or clean up, and the same token after a daemon restart. The
nodes of a cluster derive the key from their shared secret instead
(:meth:`EnvdTokens.from_cluster_secret`): any node verifies any token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


class EnvdTokens:
    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"an envd token key needs at least {KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def load(cls, path: Path) -> EnvdTokens:
        """The key in ``path``, created (mode 0600) on first use."""
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(KEY_BYTES)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        # A concurrent first start may have won the race: keep whichever key landed.
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path.read_bytes())

    @classmethod
    def from_cluster_secret(cls, secret: bytes) -> EnvdTokens:
        """The key every node of a cluster derives from the secret they share, so a
        token handed out by one node holds on every other."""
        return cls(hmac.new(secret, b"kiln e2b envd token key", hashlib.sha256).digest())

    def issue(self, sandbox_id: str) -> str:
        return hmac.new(self._key, sandbox_id.encode(), hashlib.sha256).hexdigest()

    def verify(self, sandbox_id: str, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.issue(sandbox_id), token)
