"""This daemon's membership of the cluster: its row in ``nodes`` and the lease on it.

At start (:func:`join`) the daemon proves it holds the cluster's secret (its
fingerprint is claimed in the store's ``settings``, as the secret key's public
half is: a node with another secret is refused), takes the live sandboxes that
have no node when it is the only node alive, and (:meth:`Membership.register`)
writes its row: the address other nodes reach it at, the engines it can run, the
CPUs, memory and disk it offers and its load. :meth:`Membership.run` renews the
lease every ``lease_s / 3`` with the load average; a renewal that fails (the
database away for a moment) is logged and tried again at the next tick, and the
daemon keeps serving: its peers see it lost only once the lease has run out.

A clean shutdown (:meth:`Membership.leave`) sets the lease to end now: the node
is ``lost`` at once, so no create is placed on a daemon that is gone, and what
happens to its sandboxes is the same as after a crash, only sooner. The next
start takes the row over again (its drain state kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kiln.config import Config, ConfigError
from kiln.store import Node, NotFound, Store, StoreError

from .errors import ClusterError
from .node import ClusterNode
from .peer import PeerAuth
from .placement import STALE_START_S

log = logging.getLogger("kiln.cluster")

#: The ``settings`` row naming the cluster secret (its fingerprint, never the secret).
SECRET_SETTING: Final = "cluster_secret_fingerprint"


@dataclass(frozen=True, slots=True)
class Resources:
    """What a node offers to sandboxes."""

    engines: tuple[str, ...]
    cpus: int
    memory_mb: int
    disk_mb: int


def host_memory_mb() -> int:
    """The host's memory (``MemTotal``), in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise ClusterError("/proc/meminfo has no MemTotal")  # pragma: no cover


def resources(config: Config, engines: Sequence[str]) -> Resources:
    """This node's offer: ``cluster.cpus``/``cluster.memory_mb`` or the host's, and
    the size of the disk under ``data_dir``."""
    c = config.cluster
    disk = shutil.disk_usage(config.data_dir)
    return Resources(
        engines=tuple(engines),
        cpus=c.cpus if c.cpus is not None else os.cpu_count() or 1,
        memory_mb=c.memory_mb if c.memory_mb is not None else host_memory_mb(),
        disk_mb=disk.total >> 20,
    )


def load_average() -> float:
    return os.getloadavg()[0]


def join(store: Store, config: Config) -> ClusterNode:
    """This daemon as a node of ``store``: the cluster secret loaded (made on the
    first node) and checked against the store's. :class:`ClusterError` with one clear
    line when it cannot join (another secret, no address other nodes can reach)."""
    try:
        address = config.node_address
    except ConfigError as exc:
        raise ClusterError(str(exc)) from exc
    del address  # checked now, used by register
    path: Path = config.cluster_secret_path
    peer = PeerAuth.load(config.node_name, path)
    try:
        same = store.claim_setting(SECRET_SETTING, peer.fingerprint)
    except StoreError as exc:
        raise ClusterError(f"cannot check the cluster secret: {exc}") from exc
    if not same:
        raise ClusterError(
            f"the cluster secret {path} is not this cluster's: every node on one store"
            " must use the same secret file (copy it from a node already running)"
        )
    taken = store.adopt_unplaced(peer.node)
    if taken:
        log.info("cluster: node %s took %d sandbox(es) made before it joined", peer.node, taken)
    return ClusterNode(store, peer)


class Membership:
    """This node's row and lease (see the module's docstring)."""

    def __init__(self, store: Store, config: Config, offer: Resources) -> None:
        self.store = store
        self.name = config.node_name
        self.address = config.node_address
        self.lease_s = config.cluster.lease_s
        self.offer = offer
        self._stopping = asyncio.Event()

    def register(self) -> Node:
        node = self.store.register_node(
            self.name,
            address=self.address,
            engines=self.offer.engines,
            cpus=self.offer.cpus,
            memory_mb=self.offer.memory_mb,
            disk_mb=self.offer.disk_mb,
            lease_s=self.lease_s,
            load=load_average(),
        )
        log.info(
            "cluster: node %s registered at %s (%s; %d CPUs, %d MB; lease %.0f s)",
            node.name,
            node.address,
            ", ".join(node.engines) or "no engine",
            node.cpus,
            node.memory_mb,
            self.lease_s,
        )
        return node

    def renew(self) -> Node:
        """One renewal (a row an admin removed is registered again), which also
        forgets creates counted here long ago and never given back."""
        try:
            node = self.store.renew_node(self.name, lease_s=self.lease_s, load=load_average())
        except NotFound:
            log.warning("cluster: node %s was removed from the store; registering again", self.name)
            return self.register()
        if node.starting and self.store.forget_stale_starts(self.name, older_than_s=STALE_START_S):
            log.warning(
                "cluster: node %s forgot %d create(s) counted as starting more than %.0f s"
                " ago (their placing node never gave them back)",
                self.name,
                node.starting,
                STALE_START_S,
            )
        return node

    async def run(self) -> None:
        """Renew the lease every ``lease_s / 3`` until :meth:`stop`."""
        period = self.lease_s / 3
        failing = False
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=period)
            if self._stopping.is_set():
                return
            try:
                await asyncio.to_thread(self.renew)
            except StoreError as exc:
                log.warning("cluster: renewing the lease of node %s failed: %s", self.name, exc)
                failing = True
            else:
                if failing:
                    log.info("cluster: lease of node %s renewed again", self.name)
                failing = False

    def stop(self) -> None:
        self._stopping.set()

    def leave(self) -> None:
        """End the lease now (clean shutdown): other nodes see this one lost at once."""
        try:
            self.store.renew_node(self.name, lease_s=0)
        except StoreError as exc:
            log.warning("cluster: could not end the lease of node %s: %s", self.name, exc)
        else:
            log.info("cluster: node %s left (lease ended)", self.name)


def engine_names(
    available: Mapping[str, str | None], runtimes: Mapping[str, Sequence[str]]
) -> list[str]:
    """What a node records as its engines: each engine that can run here, and for one
    with runtimes each ``engine/runtime`` it has (``docker``, ``docker/runc``)."""
    names: list[str] = []
    for name, reason in available.items():
        if reason is not None:
            continue
        names.append(name)
        names += [f"{name}/{r}" for r in runtimes.get(name, ())]
    return names
