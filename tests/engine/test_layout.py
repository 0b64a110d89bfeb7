"""The sandbox record and the guest's config.json (pure)."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from kiln.engine.base import FileSpec, SandboxSpec, VolumeSpec
from kiln.engine.errors import InvalidSpec
from kiln.engine.qemu.argv import Drive
from kiln.engine.qemu.layout import (
    Record,
    guest_config,
    guest_hostname,
    spec_from_json,
    spec_to_json,
)

SPEC = SandboxSpec(
    sandbox_id="sb-1",
    name="my_box",
    cpus=2,
    memory_mb=768,
    env={"A": "1", "B": "two words"},
    files=(FileSpec("/etc/motd", b"\x00hello\xff", 0o600),),
    init="echo hi > /tmp/init",
    volumes=(VolumeSpec("data", "/data"), VolumeSpec("new", "/new", size_mb=64)),
    keep_hot=True,
)
RECORD = Record(
    spec=SPEC,
    dir="/var/lib/kiln/qemu/sandboxes/sb-1",
    token="ab" * 16,
    ip="10.213.0.7",
    tap="ktap01234567",
    mac="02:00:00:00:00:01",
    accel="tcg",
    kernel="/k",
    initrd="/i",
    image_digest="f" * 64,
    drives=(Drive("/r.qcow2", "qcow2"), Drive("/c.img"), Drive("/v/data.ext4")),
    volume_paths={"data": "/v/data.ext4"},
    created_volumes=("new",),
    created_at=1.5,
)


def test_spec_round_trips_through_json() -> None:
    data = json.loads(json.dumps(spec_to_json(SPEC)))
    assert spec_from_json(data) == SPEC


def test_record_round_trips_through_json() -> None:
    data = json.loads(json.dumps(RECORD.to_json()))
    assert Record.from_json(data) == RECORD


def test_guest_config_matches_what_the_agent_reads() -> None:
    net = {"address": "10.213.0.7/24", "gateway": "10.213.0.1", "dns": ["9.9.9.9"], "mac": "02:x"}
    cfg = guest_config(
        RECORD, net, [("/dev/vdc", "/data", 1 << 20), ("/dev/vdd", "/new", 64 << 20)], None
    )
    assert cfg["sandbox_id"] == "sb-1"
    assert cfg["hostname"] == "my-box"
    assert cfg["token"] == RECORD.token
    assert cfg["env"] == {"A": "1", "B": "two words"}
    assert cfg["files"] == [
        {
            "path": "/etc/motd",
            "content": base64.b64encode(b"\x00hello\xff").decode(),
            "mode": "0600",
        }
    ]
    assert cfg["volumes"] == [
        {"device": "/dev/vdc", "mount": "/data", "fstype": "ext4", "size": 1 << 20},
        {"device": "/dev/vdd", "mount": "/new", "fstype": "ext4", "size": 64 << 20},
    ]
    assert cfg["init"] == "echo hi > /tmp/init"
    assert cfg["dns"] == ["9.9.9.9"]
    assert cfg["network"] == {"address": "10.213.0.7/24", "gateway": "10.213.0.1", "mac": "02:x"}
    assert "user" not in cfg
    assert guest_config(RECORD, net, [], "dev")["user"] == "dev"


def test_the_config_is_accepted_by_the_guest_parser() -> None:
    from kiln.guest.config import GuestConfig  # noqa: PLC0415

    net = {
        "address": "10.213.0.7/24",
        "gateway": "10.213.0.1",
        "dns": [],
        "mac": "02:00:00:00:00:01",
    }
    parsed = GuestConfig.from_json(guest_config(RECORD, net, [("/dev/vdc", "/data", 4096)], None))
    assert parsed.hostname == "my-box"
    assert parsed.files[0].content == b"\x00hello\xff" and parsed.files[0].mode == 0o600
    assert parsed.network is not None and parsed.network.address == "10.213.0.7/24"


def test_hostnames() -> None:
    assert guest_hostname("box_1") == "box-1"
    assert guest_hostname("a.b-c") == "a.b-c"
    assert guest_hostname("_") == "sandbox"
    assert len(guest_hostname("x" * 63)) == 63


def test_a_sandbox_s_own_user_goes_on_its_config_drive() -> None:
    # The E2B API's sandboxes ask for the account "user"; the engine-wide override
    # (QemuConfig.guest_user) yields to it, and the spec keeps it in the record.
    record = replace(RECORD, spec=replace(SPEC, user="user"))
    net = {"address": "10.213.0.7/24", "gateway": "10.213.0.1", "mac": "02:x"}
    assert guest_config(record, net, [], None)["user"] == "user"
    assert guest_config(record, net, [], "dev")["user"] == "user"
    assert Record.from_json(json.loads(json.dumps(record.to_json()))).spec.user == "user"
    assert SPEC.guest_config("t").get("user") is None


@pytest.mark.parametrize("user", ["", "Root", "a b", "x" * 40, "../etc"])
def test_a_bad_user_name_is_refused(user: str) -> None:
    with pytest.raises(InvalidSpec, match="user name"):
        replace(SPEC, user=user).validate()
