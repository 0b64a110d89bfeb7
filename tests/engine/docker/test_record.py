"""The Docker engine's sandbox record and guest config (pure)."""

from __future__ import annotations

from kiln.engine import SandboxSpec
from kiln.engine.docker.record import Record, guest_config
from kiln.network import GuestNetwork


def _record(**changes: object) -> Record:
    spec = SandboxSpec(sandbox_id="sb-1", name="one", init="echo hi")
    fields: dict[str, object] = {
        "spec": spec,
        "runtime": "runc",
        "token": "t0",
        "ip": "10.213.1.5",
        "image": "kiln/minimal:abc",
        "agent": "/state/agents/x.pyz",
    }
    return Record(**{**fields, **changes})  # type: ignore[arg-type]


def test_own_network_round_trips_and_older_records_are_on_dockerds() -> None:
    own = _record(own_network=True)
    assert Record.from_json(own.to_json()).own_network
    older = own.to_json()
    del older["own_network"]  # written before containers had their own network
    assert not Record.from_json(older).own_network


def test_guest_config_names_the_network_to_wait_for() -> None:
    network = GuestNetwork(
        address="10.213.1.5/24", gateway="10.213.1.1", dns=["192.0.2.53"], mac="x"
    )
    config = guest_config(_record(own_network=True), network)
    assert config["network"] == {
        "address": "10.213.1.5/24",
        "gateway": "10.213.1.1",
        "mac": "02:42:0a:d5:01:05",  # the veth's: made of the address
    }
    assert config["init"] == "echo hi"
    assert "network" not in guest_config(_record())


def test_a_pooled_sandbox_is_made_as_its_member() -> None:
    pooled = _record(member="pool-0123456789ab")
    again = Record.from_json(pooled.to_json())
    assert (again.member, again.made_as, again.container) == (
        "pool-0123456789ab",
        "pool-0123456789ab",  # its veth, label and config directory
        "kiln-sb-1",  # its container is renamed
    )
    older = pooled.to_json()
    del older["member"]  # written before the pool
    assert Record.from_json(older).made_as == "sb-1"
