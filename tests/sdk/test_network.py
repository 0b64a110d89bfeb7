"""Egress policies through the SDK: ``network=`` reaches the daemon (as a
:class:`NetworkPolicy` or its dict) and the policy it keeps comes back."""

from __future__ import annotations

import pytest

from kiln.sdk import AsyncKiln, Kiln, NetworkPolicy, ValidationError

from .conftest import Daemon, unique


def test_create_with_a_policy(kiln: Kiln) -> None:
    policy = NetworkPolicy("deny", allow=("pypi.org", "203.0.113.0/24"))
    with kiln.sandboxes.create(name=unique("net"), network=policy) as sb:
        assert sb.network == policy
        assert kiln.sandboxes.get(sb.name).network == policy
    with kiln.sandboxes.create(network={"deny": ["10.0.0.0/8"]}) as sb:
        assert sb.network == NetworkPolicy("allow", (), ("10.0.0.0/8",))
    with kiln.sandboxes.create() as sb:
        assert sb.network == NetworkPolicy(), "the daemon's default"


def test_a_bad_policy_is_a_validation_error(kiln: Kiln) -> None:
    with pytest.raises(ValidationError, match="not a host"):
        kiln.sandboxes.create(network=NetworkPolicy(allow=("not a host",)))
    with pytest.raises(ValidationError, match="egress"):
        kiln.sandboxes.create(network={"egress": "sometimes"})


async def test_async_create_with_a_policy(daemon: Daemon) -> None:
    async with AsyncKiln(daemon.url, daemon.token) as ak:
        sb = await ak.sandboxes.create(network=NetworkPolicy("deny", allow=("1.1.1.1",)))
        try:
            assert sb.network == NetworkPolicy("deny", ("1.1.1.1/32",), ())
        finally:
            await sb.delete()
