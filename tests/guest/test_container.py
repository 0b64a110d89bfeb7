"""The container agent's wait for the network the host plumbs (real ioctls, real
/proc/net/route, in the test's own namespace: read only)."""

from __future__ import annotations

import time

import pytest

from kiln.guest.config import NetworkSpec
from kiln.guest.container import wait_for_network


def test_a_present_address_needs_no_wait() -> None:
    start = time.monotonic()
    assert wait_for_network(NetworkSpec("127.0.0.1/8", interface="lo"), patience=5)
    assert time.monotonic() - start < 1


@pytest.mark.parametrize(
    "network",
    [
        NetworkSpec("127.0.0.2/8", interface="lo"),  # not lo's address
        NetworkSpec("10.213.99.5/24", interface="kiln-nope0"),  # no such device
        # lo has the address but no default route through 192.0.2.1
        NetworkSpec("127.0.0.1/8", gateway="192.0.2.1", interface="lo"),
    ],
)
def test_a_missing_network_is_waited_for_then_given_up(
    network: NetworkSpec, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.monotonic()
    assert not wait_for_network(network, patience=0.1)
    assert 0.1 <= time.monotonic() - start < 2
    assert "going on without it" in caplog.text
