"""IPPool: lowest-free allocation, release, recovery, exhaustion, threads (pure)."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address

import pytest

from kiln.network import AddressError, InvalidInput, IPPool, PoolExhausted


@pytest.fixture
def pool() -> IPPool:
    return IPPool("10.213.0.0/24")


def test_allocates_lowest_free_from_dot_2(pool: IPPool) -> None:
    assert pool.allocate("a") == "10.213.0.2"
    assert pool.allocate("b") == "10.213.0.3"
    assert pool.owner_of("10.213.0.2") == "a"
    assert pool.address_of("b") == "10.213.0.3"
    assert pool.owner_of("10.213.0.9") is None


def test_allocate_is_idempotent_per_owner(pool: IPPool) -> None:
    assert pool.allocate("a") == pool.allocate("a") == "10.213.0.2"
    assert pool.free_count() == 252


def test_release_and_reuse_lowest(pool: IPPool) -> None:
    for owner in "abc":
        pool.allocate(owner)
    pool.release("10.213.0.3")
    assert pool.owner_of("10.213.0.3") is None
    assert pool.address_of("b") is None
    pool.release("10.213.0.3")  # already free: fine
    assert pool.allocate("d") == "10.213.0.3"
    assert pool.allocate("e") == "10.213.0.5"


def test_exhaustion_has_a_clear_error(pool: IPPool) -> None:
    got = {pool.allocate(f"sb{i}") for i in range(253)}
    assert len(got) == 253
    assert "10.213.0.1" not in got
    assert "10.213.0.255" not in got
    assert max(got, key=IPv4Address) == "10.213.0.254"
    with pytest.raises(PoolExhausted, match=r"no free guest address left in 10\.213\.0\.0/24"):
        pool.allocate("one-too-many")
    pool.release("10.213.0.100")
    assert pool.allocate("one-too-many") == "10.213.0.100"


def test_mark_in_use_for_recovery(pool: IPPool) -> None:
    pool.mark_in_use("10.213.0.7", "old")
    pool.mark_in_use(IPv4Address("10.213.0.7"), "old")  # same pair again: fine
    assert pool.owner_of("10.213.0.7") == "old"
    assert pool.allocate("new") == "10.213.0.2"
    with pytest.raises(AddressError, match="already held by 'old'"):
        pool.mark_in_use("10.213.0.7", "other")
    with pytest.raises(AddressError, match=r"'old' already holds 10\.213\.0\.7"):
        pool.mark_in_use("10.213.0.8", "old")
    assert pool.in_use() == {"10.213.0.2": "new", "10.213.0.7": "old"}


@pytest.mark.parametrize("ip", ["10.213.0.1", "10.213.0.255", "10.213.0.0", "10.9.0.5", "x"])
def test_addresses_outside_the_guest_range_are_rejected(pool: IPPool, ip: str) -> None:
    with pytest.raises(InvalidInput):
        pool.mark_in_use(ip, "a")
    with pytest.raises(InvalidInput):
        pool.release(ip)


def test_bad_owner_and_subnet() -> None:
    with pytest.raises(InvalidInput, match="owner"):
        IPPool("10.213.0.0/24").allocate("")
    with pytest.raises(InvalidInput, match="/24"):
        IPPool("10.213.0.0/23")


def test_concurrent_allocation_hands_out_distinct_addresses(pool: IPPool) -> None:
    results: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(25):
            ip = pool.allocate(f"t{n}-{i}")
            with lock:
                results.append(ip)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(set(results)) == 250
