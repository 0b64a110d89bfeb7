"""Deterministic names and MACs, and the name validators (pure)."""

from __future__ import annotations

import pytest

from kiln.network import InvalidInput, bridge_mac, guest_mac, tap_name
from kiln.network.naming import normalize_mac, validate_ifname, validate_netns


def _is_local_unicast(mac: str) -> bool:
    first = int(mac.split(":", maxsplit=1)[0], 16)
    return bool(first & 0x02) and not first & 0x01


def test_tap_name_is_prefix_plus_8_hex_and_fits_ifnamsiz() -> None:
    name = tap_name("ktap", "sb-0123")
    assert name.startswith("ktap")
    assert len(name) == 12
    int(name[4:], 16)
    assert tap_name("ktap", "sb-0123") == name
    assert tap_name("ktap", "sb-0124") != name
    assert len(tap_name("kiln-tp", "x" * 128)) == 15


def test_macs_are_deterministic_locally_administered_unicast() -> None:
    assert guest_mac("sb-1") == guest_mac("sb-1")
    assert guest_mac("sb-1") != guest_mac("sb-2")
    assert bridge_mac("kiln0") == bridge_mac("kiln0")
    assert bridge_mac("kiln0") != bridge_mac("kiln1")
    for mac in (guest_mac("sb-1"), bridge_mac("kiln0")):
        assert _is_local_unicast(mac)
        assert normalize_mac(mac) == mac


@pytest.mark.parametrize(
    "name", ["", "a" * 16, "has space", "a/b", "a:b", ".", "-lead", "x\n", 7, None]
)
def test_bad_interface_names(name: object) -> None:
    with pytest.raises(InvalidInput, match="name"):
        validate_ifname(name)


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "x" * 65, "sp ace", None])
def test_bad_namespace_names(name: object) -> None:
    with pytest.raises(InvalidInput, match="network namespace name"):
        validate_netns(name)


@pytest.mark.parametrize(
    ("prefix", "match"),
    [("", "non-empty"), ("abcdefgh", "longer than 7"), ("1tap", "start with a letter")],
)
def test_bad_tap_prefix(prefix: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        tap_name(prefix, "sb")


@pytest.mark.parametrize("sandbox_id", ["", "x" * 129, "new\nline"])
def test_bad_sandbox_ids(sandbox_id: str) -> None:
    with pytest.raises(InvalidInput, match="sandbox id"):
        tap_name("ktap", sandbox_id)
    with pytest.raises(InvalidInput, match="sandbox id"):
        guest_mac(sandbox_id)


@pytest.mark.parametrize(
    ("mac", "match"),
    [
        ("02:00:00:00:00", "of the form"),
        ("zz:00:00:00:00:00", "of the form"),
        ("01:00:5e:00:00:01", "multicast"),
        ("00:00:00:00:00:00", "all zeros"),
    ],
)
def test_bad_macs(mac: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        normalize_mac(mac)


def test_mac_normalization() -> None:
    assert normalize_mac("02-AB-cd-00-11-22") == "02:ab:cd:00:11:22"
