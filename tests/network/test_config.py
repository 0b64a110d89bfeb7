"""NetworkConfig validation and resolv.conf parsing (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from kiln.network import (
    InvalidInput,
    NetworkConfig,
    bridge_mac,
    host_nameservers,
    parse_resolv_conf,
)


def test_defaults() -> None:
    cfg = NetworkConfig()
    assert cfg.bridge == "kiln0"
    assert str(cfg.network) == "10.213.0.0/24"
    assert cfg.gateway == IPv4Address("10.213.0.1")
    assert cfg.tap_prefix == "ktap"
    assert cfg.netns is None
    assert cfg.nat is True
    assert cfg.effective_bridge_mac == bridge_mac("kiln0")


def test_other_private_24s_are_fine() -> None:
    for subnet in ("192.168.50.0/24", "172.20.1.0/24", "100.64.3.0/24"):
        cfg = NetworkConfig(subnet=subnet)
        assert cfg.gateway == cfg.network.network_address + 1


@pytest.mark.parametrize(
    ("subnet", "match"),
    [
        ("bogus", "not a valid network"),
        ("10.213.0.5/24", "has host bits set"),
        ("10.213.0.0/16", r"must be a /24 \(got /16\)"),
        ("10.213.0.0/25", r"must be a /24"),
        ("fd00::/64", "not IPv4"),
        ("8.8.8.0/24", "not a private range"),
        ("127.0.0.0/24", "not a private range"),
        ("169.254.1.0/24", "not a private range"),
        ("0.0.0.0/24", "not a private range"),
        ("224.0.0.0/24", "not a private range"),
        (24, "must be a string"),
    ],
)
def test_bad_subnets(subnet: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        NetworkConfig(subnet=subnet)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bridge": "a-very-long-bridge"}, "bridge name .* longer than 15"),
        ({"bridge": "br/0"}, "bridge name"),
        ({"bridge": ""}, "bridge name"),
        ({"tap_prefix": "toolong8"}, "TAP prefix"),
        ({"bridge": "ktap0"}, "starts with the TAP prefix"),
        ({"netns": "../etc"}, "network namespace name"),
        ({"bridge_mac": "01:00:00:00:00:01"}, "bridge MAC .* multicast"),
        ({"nat": "yes"}, "nat must be a bool"),
        ({"dns": "1.1.1.1"}, "dns must be a list"),
        ({"dns": ("1.1.1.1", "resolver")}, "'resolver' is not an IPv4"),
    ],
)
def test_bad_config_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        NetworkConfig(**kwargs)  # type: ignore[arg-type]


def test_explicit_values_are_normalized() -> None:
    cfg = NetworkConfig(bridge_mac="02:AA:BB:CC:DD:EE", dns=["9.9.9.9"])  # type: ignore[arg-type]
    assert cfg.effective_bridge_mac == "02:aa:bb:cc:dd:ee"
    assert cfg.dns == ("9.9.9.9",)


def test_parse_resolv_conf_keeps_ipv4_non_loopback_in_order() -> None:
    text = """
    # comment
    search example.org
    nameserver 127.0.0.53
    nameserver 10.255.255.53
    nameserver fe80::1%eth0
    nameserver 2001:db8::1
    nameserver 192.0.2.1
    nameserver 10.255.255.53
    nameserver
    options edns0
    """
    assert parse_resolv_conf(text) == ["10.255.255.53", "192.0.2.1"]


def test_host_nameservers_falls_through_files(tmp_path: Path) -> None:
    stub = tmp_path / "stub.conf"
    stub.write_text("nameserver 127.0.0.53\n")
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("nameserver 192.0.2.7\n")
    assert host_nameservers([tmp_path / "missing", stub, upstream]) == ["192.0.2.7"]
    assert host_nameservers([stub]) == []
