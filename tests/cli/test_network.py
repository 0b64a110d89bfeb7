"""Egress policies from the command line: the real ``kiln`` process, a real daemon.

``--egress/--allow/--deny`` on ``create`` and ``run`` must reach the daemon, which
normalizes and echoes the policy (``inspect`` and ``--json`` show it), or refuses a
bad entry with a message naming it. What the rules do is tested on real bridges.
"""

from __future__ import annotations

import json

from kiln.sdk import Kiln

from .conftest import Cli, unique


def test_create_with_a_policy_shows_it(cli: Cli, kiln: Kiln) -> None:
    name = unique("net")
    out = cli.ok(
        "create", "--name", name, "--egress", "deny", "--allow", "PyPI.org", "--allow", "1.2.3.4"
    )
    try:
        assert "network:     egress deny; allow pypi.org, 1.2.3.4/32\n" in out
        shown = json.loads(cli.ok("inspect", name, "--json"))
        assert shown["network"] == {
            "egress": "deny",
            "allow": ["pypi.org", "1.2.3.4/32"],
            "deny": [],
        }
        policy = kiln.sandboxes.get(name).network
        assert policy is not None and policy.allow == ("pypi.org", "1.2.3.4/32")
    finally:
        cli.ok("rm", name)
    plain = unique("net")
    out = cli.ok("create", "--name", plain, "--deny", "10.9.0.0/16")
    try:
        assert "network:     egress allow; deny 10.9.0.0/16\n" in out
    finally:
        cli.ok("rm", plain)


def test_a_bad_entry_is_refused_and_nothing_is_created(cli: Cli, kiln: Kiln) -> None:
    before = len(kiln.sandboxes.list())
    proc = cli("create", "--allow", "not a host")
    assert proc.returncode != 0
    assert "not a host" in proc.stderr.decode()
    proc = cli("create", "--egress", "maybe")
    assert proc.returncode == 2 and "maybe" in proc.stderr.decode()
    assert len(kiln.sandboxes.list()) == before


def test_run_with_a_policy(cli: Cli, kiln: Kiln) -> None:
    tag = unique("net")
    cli.ok("run", "--rm", "-l", f"t={tag}", "--egress", "deny", "--", "true")
    assert kiln.sandboxes.list(labels={"t": tag}) == []
    proc = cli("run", "--rm", "--deny", "::1", "--", "true")
    assert proc.returncode != 0 and "IPv6" in proc.stderr.decode()
