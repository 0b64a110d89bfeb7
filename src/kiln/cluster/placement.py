"""Which node a new sandbox goes to.

A node can take a sandbox when it runs the sandbox's engine (and runtime), is
``active`` with a lease that holds, has fewer than :data:`MAX_STARTING` creates
in progress, and has room: what its live sandboxes take plus what the creates
in progress there reserved, plus the new one, stays within what it offers times
the overcommit factor. CPUs are overcommitted :data:`CPU_OVERCOMMIT` times (a
sandbox's vCPUs are mostly idle, and under TCG a vCPU is a host thread that
time-shares anyway); memory is not overcommitted (:data:`MEMORY_OVERCOMMIT`): a
guest's RAM is really taken, and a host that swaps slows every sandbox on it.

Among the nodes that can, :data:`BEST_OF` are drawn at random and the least
loaded of them wins (the "power of two choices": nearly as even as always
taking the least loaded node, without every API node piling onto the same one
at once). Load is the larger of the CPU and memory shares taken, plus
:data:`STARTING_WEIGHT` per create in progress.

All of it runs inside :meth:`kiln.store.Store.reserve_node`'s transaction: the
random draw over the unlocked rows, the choice over the drawn rows once locked.

A sandbox that exists already stays on its node (``sandboxes.node``): starting a
cold one there restores its snapshot where the files are. Moving one (its node
lost, or drained) places it again with ``prefer=`` the node holding its files when
that node can take it (:meth:`Placer.reserve`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from kiln.store import Node, NodeLoad, NodeUsage, Store

from .errors import ClusterError

CPU_OVERCOMMIT: Final = 4.0
MEMORY_OVERCOMMIT: Final = 1.0
#: Creates in progress on one node at most (a boot under TCG takes seconds of CPU).
MAX_STARTING: Final = 4
BEST_OF: Final = 2
STARTING_WEIGHT: Final = 0.05
#: A placing node waits this long at most for the node it chose to create a sandbox.
FORWARD_TIMEOUT_S: Final = 900.0
#: Creates counted as starting on a node, none newer than this: leftovers of a placing
#: node that died mid-create; the node's own lease renewal forgets them.
STALE_START_S: Final = FORWARD_TIMEOUT_S + 300.0


class NoCapacity(ClusterError):
    """No node can take the sandbox: none runs its engine, or none has room."""


class NodesBusy(ClusterError):
    """Nodes have room, but every one of them is starting as many sandboxes as it may."""


@dataclass(frozen=True, slots=True)
class Shape:
    """What placement needs to know of a sandbox."""

    engine: str
    cpus: int
    memory_mb: int
    runtime: str | None = None


def runs(node: Node, shape: Shape) -> bool:
    """Whether ``node`` has the sandbox's engine, and its runtime when one is asked
    (a node that lists no runtime for an engine did not know them: any goes)."""
    if shape.engine not in node.engines:
        return False
    if shape.runtime is None:
        return True
    prefix = f"{shape.engine}/"
    known = [e for e in node.engines if e.startswith(prefix)]
    return not known or f"{prefix}{shape.runtime}" in known


def has_room(load: NodeLoad, shape: Shape) -> bool:
    node, used = load.node, load.usage
    cpus = used.cpus + node.starting_cpus + shape.cpus
    memory = used.memory_mb + node.starting_memory_mb + shape.memory_mb
    return cpus <= node.cpus * CPU_OVERCOMMIT and memory <= node.memory_mb * MEMORY_OVERCOMMIT


def share(load: NodeLoad) -> float:
    """How loaded a node is: its larger share taken, plus its creates in progress."""
    node, used = load.node, load.usage
    cpu = (used.cpus + node.starting_cpus) / max(node.cpus * CPU_OVERCOMMIT, 1e-9)
    mem = (used.memory_mb + node.starting_memory_mb) / max(node.memory_mb * MEMORY_OVERCOMMIT, 1e-9)
    return max(cpu, mem) + STARTING_WEIGHT * node.starting


def can_take(load: NodeLoad, shape: Shape) -> bool:
    return runs(load.node, shape) and load.node.starting < MAX_STARTING and has_room(load, shape)


class Placer:
    """Places sandboxes on the nodes of ``store`` (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._rng = rng or random.Random()
        self._clock = clock

    def reserve(
        self, shape: Shape, exclude: Collection[str] = (), *, prefer: str | None = None
    ) -> Node:
        """The node chosen for ``shape`` (not one of ``exclude``), with the create
        counted as starting there: :meth:`release` it once the create is over.
        :class:`NoCapacity` or :class:`NodesBusy` when there is none.

        ``prefer``: the node to take whenever it can (the one holding a cold
        sandbox's snapshot, when the sandbox is started somewhere again: no copy);
        the others are only drawn when it cannot."""

        def shortlist(loads: Sequence[NodeLoad]) -> list[str]:
            fit = [x.node.name for x in loads if x.node.name not in exclude and can_take(x, shape)]
            if prefer in fit:
                return [prefer]
            return self._rng.sample(fit, min(BEST_OF, len(fit)))

        def choose(loads: Sequence[NodeLoad]) -> str | None:
            fit = [x for x in loads if can_take(x, shape)]
            return min(fit, key=share).node.name if fit else None

        node = self.store.reserve_node(
            shortlist, choose, cpus=shape.cpus, memory_mb=shape.memory_mb
        )
        if node is None:
            raise self._why_not(shape, exclude)
        return node

    def release(self, node: str, shape: Shape) -> None:
        self.store.release_node(node, cpus=shape.cpus, memory_mb=shape.memory_mb)

    def _why_not(self, shape: Shape, exclude: Collection[str]) -> ClusterError:
        """The error that says why no node was found (read again, without locks)."""
        now = self._clock()
        nodes = [n for n in self.store.list_nodes() if n.name not in exclude]
        alive = [n for n in nodes if n.status(now) == "active"]
        engine = shape.engine if shape.runtime is None else f"{shape.engine}/{shape.runtime}"
        tried = f" (besides {', '.join(sorted(exclude))}, which refused)" if exclude else ""
        if not alive:
            return NoCapacity(f"no active node can take a sandbox{tried}")
        able = [n for n in alive if runs(n, shape)]
        if not able:
            return NoCapacity(f"no active node runs the {engine} engine{tried}")
        usage = self.store.node_usage([n.name for n in able])
        loads = [NodeLoad(n, usage.get(n.name, NodeUsage())) for n in able]
        if any(has_room(x, shape) for x in loads):
            return NodesBusy(
                f"every node with room is starting {MAX_STARTING} sandboxes already; try again"
            )
        return NoCapacity(
            f"no node has room for {shape.cpus} CPU(s) and {shape.memory_mb} MB{tried}"
        )
