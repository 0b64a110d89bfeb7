"""The cluster's nodes as the API shows them (``/nodes``, admins only).

On a single daemon (a SQLite store) there are no nodes: the list is empty and a
node named in a path is not found ("not a cluster"). ``DELETE`` forgets a node
(one that will not come back); it is refused while live sandboxes are on it.
"""

from __future__ import annotations

from typing import Any

from kiln.store import Node, NodeState, NodeUsage, NotFound, User

from .errors import Forbidden, NotFoundError
from .services import Services


class NodeService:
    def __init__(self, services: Services) -> None:
        self._s = services

    def _admin(self, user: User) -> None:
        if not user.is_admin:
            raise Forbidden("only an admin may see or change the cluster's nodes")

    def _cluster(self, name: str) -> None:
        if self._s.cluster is None:
            raise NotFoundError(
                f"no node {name!r}: this daemon is not a cluster (its store is SQLite)"
            )

    def view(self, node: Node, usage: NodeUsage) -> dict[str, Any]:
        now = self._s.clock()
        return {
            "name": node.name,
            "address": node.address,
            "engines": list(node.engines),
            "cpus": node.cpus,
            "memory_mb": node.memory_mb,
            "disk_mb": node.disk_mb,
            "load": round(node.load, 2),
            "state": node.state.value,
            "status": node.status(now),
            "sandboxes": usage.sandboxes,
            "cpus_allocated": usage.cpus,
            "memory_allocated_mb": usage.memory_mb,
            "starting": node.starting,
            "lease_left_s": round(node.lease_until - now, 1),
            "registered_at": node.registered_at,
        }

    def list_for(self, user: User) -> list[dict[str, Any]]:
        self._admin(user)
        if self._s.cluster is None:
            return []
        store = self._s.store
        usage = store.node_usage()
        return [self.view(n, usage.get(n.name, NodeUsage())) for n in store.list_nodes()]

    def get(self, user: User, name: str) -> dict[str, Any]:
        self._admin(user)
        self._cluster(name)
        return self._one(name)

    def set_state(self, user: User, name: str, state: NodeState) -> dict[str, Any]:
        self._admin(user)
        self._cluster(name)
        self._s.store.set_node_state(name, state)
        return self._one(name)

    def delete(self, user: User, name: str) -> None:
        self._admin(user)
        self._cluster(name)
        self._s.store.delete_node(name)

    def _one(self, name: str) -> dict[str, Any]:
        store = self._s.store
        try:
            node = store.get_node(name)
        except NotFound:
            raise NotFoundError(f"no node {name!r}") from None
        return self.view(node, store.node_usage([name]).get(name, NodeUsage()))
