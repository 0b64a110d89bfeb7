"""The pure parts of a fork's identity change: the identity block and uevents."""

from __future__ import annotations

import pytest

from kiln.guest.config import IDENTITY_BLOCK, identity_block, parse_identity
from kiln.guest.errors import ConfigError
from kiln.guest.reidentify import is_drive_resize, parse_uevent

IDENTITY = {
    "sandbox_id": "sb-2",
    "hostname": "copy",
    "token": "t" * 32,
    "dns": ["10.0.0.1"],
    "network": {"address": "10.0.0.7/24", "gateway": "10.0.0.1", "mac": "52:54:00:00:00:07"},
    "clock_ns": 1_763_700_000_000_000_000,
    "seed": "c2VlZA==",
}


def test_an_identity_block_round_trips() -> None:
    block = identity_block(IDENTITY)
    assert len(block) == IDENTITY_BLOCK
    config = parse_identity(block[:64], lambda off, n: block[off : off + n])
    assert config is not None
    assert (config.sandbox_id, config.hostname, config.token) == ("sb-2", "copy", "t" * 32)
    assert config.network is not None and config.network.mac == "52:54:00:00:00:07"
    assert (config.clock_ns, config.seed) == (1_763_700_000_000_000_000, b"seed")


def test_anything_else_is_no_identity_or_a_clear_error() -> None:
    assert parse_identity(b"\0" * 4096, lambda off, n: b"") is None
    huge = identity_block(IDENTITY)[:19] + (IDENTITY_BLOCK).to_bytes(8, "big")
    with pytest.raises(ConfigError, match="claims"):
        parse_identity(huge, lambda off, n: b"")
    with pytest.raises(ValueError, match="does not fit"):
        identity_block({"token": "x" * IDENTITY_BLOCK})


def test_only_a_resize_of_the_config_drive_counts() -> None:
    raw = b"change@/devices/virtio-mmio/block/vdb\0ACTION=change\0DEVNAME=vdb\0RESIZE=1\0"
    event = parse_uevent(raw)
    assert event["DEVNAME"] == "vdb"
    assert is_drive_resize(event, "/dev/vdb")
    assert not is_drive_resize(event, "/dev/vdc")  # a volume's resize (template slots)
    assert not is_drive_resize({**event, "RESIZE": "0"}, "/dev/vdb")
    assert not is_drive_resize({**event, "ACTION": "add"}, "/dev/vdb")
