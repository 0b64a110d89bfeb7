"""``network`` on create: validated, kept, shown (real HTTP, real SQLite).

What the rules do to traffic is tested on real bridges (tests/network/test_firewall.py)
and with real VMs and containers (tests/server/vm/test_isolation.py).
"""

from __future__ import annotations

import pytest

from .conftest import ApiUser
from .harness import LiveServer

DEFAULT = {"egress": "allow", "allow": [], "deny": []}


def test_a_sandbox_shows_the_default_policy_unless_given_one(
    api: ApiUser, server: LiveServer
) -> None:
    plain = api.sandbox()
    assert plain["network"] == DEFAULT
    assert server.store.get_sandbox(str(plain["id"])).config.network is None

    body = {"egress": "deny", "allow": ["PyPI.org", "203.0.113.7", "pypi.org"], "deny": []}
    sb = api.sandbox(network=body)
    want = {"egress": "deny", "allow": ["pypi.org", "203.0.113.7/32"], "deny": []}
    assert sb["network"] == want
    assert api.http.get(f"/sandboxes/{sb['id']}").json()["network"] == want
    listed = {s["id"]: s for s in api.http.get("/sandboxes").json()}
    assert listed[sb["id"]]["network"] == want
    assert server.store.get_sandbox(str(sb["id"])).config.network == want

    only_deny = api.sandbox(network={"deny": ["10.1.0.0/16"]})
    assert only_deny["network"] == {"egress": "allow", "allow": [], "deny": ["10.1.0.0/16"]}


@pytest.mark.parametrize(
    ("network", "needle"),
    [
        ({"egress": "block"}, "egress"),
        ({"allow": "pypi.org"}, "allow"),
        ({"allow": ["not a host"]}, "not a host"),
        ({"deny": ["2001:db8::/32"]}, "IPv6"),
        ({"deny": ["300.1.2.3"]}, "300.1.2.3"),
        ({"alow": ["pypi.org"]}, "alow"),
        ({"allow": [7]}, "allow"),
        ("deny", "network"),
        ({"allow": ["x.example"] * 300}, "allow"),
    ],
)
def test_a_bad_policy_is_a_422_naming_the_problem(
    api: ApiUser, server: LiveServer, network: object, needle: str
) -> None:
    before = len(api.http.get("/sandboxes").json())
    r = api.http.post("/sandboxes", json={"network": network})
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]
    assert len(api.http.get("/sandboxes").json()) == before, "nothing was created"
