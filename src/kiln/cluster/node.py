"""This daemon as one node of a cluster: its name, its peer credentials, and where a
sandbox lives."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.store import Node, Sandbox, Store

from .peer import PeerAuth


@dataclass(slots=True)
class ClusterNode:
    """What the layers above ask about the cluster (``Services.cluster``; None on a
    single daemon)."""

    store: Store
    peer: PeerAuth

    @property
    def name(self) -> str:
        return self.peer.node

    def is_local(self, sandbox: Sandbox) -> bool:
        """Whether ``sandbox`` lives on this node (a row with no node is this
        daemon's own: made before the store was shared)."""
        return sandbox.node is None or sandbox.node == self.name

    def home_of(self, sandbox: Sandbox) -> Node | None:
        """The node ``sandbox`` lives on, when that is another one (None: here).
        :class:`~kiln.store.NotFound` if that node's row is gone."""
        if self.is_local(sandbox):
            return None
        assert sandbox.node is not None
        return self.store.get_node(sandbox.node)
