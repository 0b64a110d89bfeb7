"""Node-to-node signatures: what one node signs, another with the same secret accepts,
and nothing else."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kiln.cluster import PeerAuth, PeerAuthError


def test_a_signature_holds_for_its_request_only(tmp_path: Path) -> None:
    a = PeerAuth.load("node-a", tmp_path / "secret")
    b = PeerAuth("node-b", a.secret)
    value = a.sign("POST", "/sandboxes/sb-1/exec?stream=1", now=1000.0)
    assert b.verify(value, "post", "/sandboxes/sb-1/exec?stream=1", now=1010.0) == "node-a"
    for method, target in (
        ("GET", "/sandboxes/sb-1/exec?stream=1"),
        ("POST", "/sandboxes/sb-2/exec"),
    ):
        with pytest.raises(PeerAuthError, match="bad peer signature"):
            b.verify(value, method, target, now=1000.0)
    with pytest.raises(PeerAuthError, match="off"):
        b.verify(value, "POST", "/sandboxes/sb-1/exec?stream=1", now=1100.0)
    other = PeerAuth("node-c", b"x" * 64)
    with pytest.raises(PeerAuthError, match="bad peer signature"):
        other.verify(value, "POST", "/sandboxes/sb-1/exec?stream=1", now=1000.0)
    forged = value.replace("node-a", "node-z", 1)
    with pytest.raises(PeerAuthError):
        b.verify(forged, "POST", "/sandboxes/sb-1/exec?stream=1", now=1000.0)
    for bad in ("", "node-a", "node-a:x:y", "::", "node-a:1000:"):
        with pytest.raises(PeerAuthError, match=r"malformed|bad peer|off"):
            b.verify(bad, "POST", "/", now=1000.0)


def test_the_secret_file_is_made_private_once_and_read_after(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "cluster-secret"
    made = PeerAuth.load("node-a", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PeerAuth.load("node-b", path).secret == made.secret
    assert PeerAuth.load("node-b", path).fingerprint == made.fingerprint
    assert made.secret not in made.fingerprint.encode()
    with pytest.raises(PeerAuthError, match="does not exist"):
        PeerAuth.load("node-a", tmp_path / "missing", create=False)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(PeerAuthError, match="too short"):
        PeerAuth.load("node-a", short)
