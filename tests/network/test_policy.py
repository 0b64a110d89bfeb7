"""Egress policies: parsing and validation (pure), and how the firewall renders them."""

from __future__ import annotations

import pytest

from kiln.network import InvalidInput
from kiln.network.firewall import FirewallConfig, Member, render, table_name
from kiln.network.policy import NetworkPolicy, parse_target


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("203.0.113.7", "203.0.113.7/32"),
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("203.0.113.9/24", "203.0.113.0/24"),  # host bits are forgiven
        (" PyPI.org. ", "pypi.org"),
        ("files.pythonhosted.org", "files.pythonhosted.org"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_targets_are_normalized(raw: str, parsed: str) -> None:
    assert parse_target(raw) == parsed


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "  ",
        "10.0.0",
        "300.1.1.1",
        "::1",
        "2001:db8::/32",
        "localhost",
        "-bad.example",
        "a..b",
        "x" * 64 + ".com",
        "a b.com",
        5,
        None,
        "http://pypi.org",
    ],
)
def test_bad_targets_are_refused_with_a_message(raw: object) -> None:
    with pytest.raises(InvalidInput, match=r"\S"):
        parse_target(raw)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("https://pypi.org/simple", "is a URL; give the domain name alone ('pypi.org')"),
        ("http://files.example:8080", "('files.example')"),
        ("2001:db8::/32", "IPv6"),
        ("pypi.org:443", "neither an IPv4 CIDR nor a domain name"),
    ],
)
def test_the_message_says_what_to_give_instead(raw: str, says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_target(raw)
    assert says in str(caught.value)


def test_policy_validation() -> None:
    assert NetworkPolicy() == NetworkPolicy("allow", (), ())
    policy = NetworkPolicy("deny", allow=("pypi.org", "1.2.3.4", "pypi.org"))
    assert policy.allow == ("pypi.org", "1.2.3.4/32")
    assert policy.domains == ("pypi.org",)
    with pytest.raises(InvalidInput, match="egress"):
        NetworkPolicy("block")
    with pytest.raises(InvalidInput, match="allow"):
        NetworkPolicy(allow="pypi.org")  # type: ignore[arg-type]  # a string, not a list
    with pytest.raises(InvalidInput, match="at most"):
        NetworkPolicy(deny=tuple(f"10.0.{i // 256}.{i % 256}" for i in range(300)))


def test_policy_json_round_trip_refuses_unknown_keys() -> None:
    policy = NetworkPolicy("deny", allow=("pypi.org",), deny=("10.0.0.0/8",))
    assert NetworkPolicy.from_json(policy.to_json()) == policy
    assert NetworkPolicy.from_json(None) == NetworkPolicy()
    with pytest.raises(InvalidInput, match="'alow'"):
        NetworkPolicy.from_json({"alow": ["pypi.org"]})


def test_config_validation() -> None:
    with pytest.raises(InvalidInput):
        FirewallConfig(table="kiln t", bridges=("kiln0",))
    with pytest.raises(InvalidInput):
        FirewallConfig(table="kiln_t", bridges=())
    with pytest.raises(InvalidInput, match="CIDRs only"):
        FirewallConfig(table="kiln_t", bridges=("kiln0",), blocked=("pypi.org",))
    assert table_name("kiln-0.x") == "kiln_kiln_0_x"


def test_render_shares_chains_and_omits_empty_sets() -> None:
    cfg = FirewallConfig(table="kiln_t", bridges=("kiln0", "kilnd0"), blocked=())
    empty = render(cfg, [])
    assert "elements" not in empty
    members = [
        Member("a", "10.213.0.2", "u1", port="ktap1", mac="02:00:00:00:00:01"),
        Member("b", "10.213.1.2", "u1"),
        Member("c", "10.213.0.3", "u2", NetworkPolicy("deny", allow=("x.example",))),
    ]
    text = render(cfg, members, {"x.example": ("203.0.113.5", "203.0.113.4")})
    assert text.count("chain egress_") == 2  # a and b share the default policy's chain
    assert text.count("chain group_") == 4  # two groups, in both tables
    assert "203.0.113.4/31" in text  # the domain's addresses, merged
    assert '"ktap1" . 10.213.0.2' in text and '"ktap1" . 02:00:00:00:00:01' in text
    assert render(cfg, list(reversed(members)), {"x.example": ("203.0.113.4", "203.0.113.5")}) == (
        render(cfg, members, {"x.example": ("203.0.113.4", "203.0.113.5")})
    ), "the same sandboxes give the same ruleset whatever the order"


def test_members_are_checked() -> None:
    with pytest.raises(InvalidInput):
        Member("a", "not-an-ip", "u1")
    with pytest.raises(InvalidInput):
        Member("a", "10.0.0.1", "u1", port="a name that is far too long")
