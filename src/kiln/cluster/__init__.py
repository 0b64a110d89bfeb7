"""kiln as a cluster: several daemons (nodes) on one PostgreSQL store.

Each node registers itself and renews a lease (:mod:`.membership`); a request that
reaches a node for a sandbox that lives on another is relayed there with the
caller's own credentials and a peer signature (:mod:`.peer`); a create is placed
on a node by capacity (:mod:`.placement`). With a SQLite store there is one
daemon and none of this runs.

Errors: :class:`ClusterError` is the root of this package's exceptions.
"""

from .errors import ClusterError, PeerAuthError
from .node import ClusterNode
from .peer import PEER_HEADER, PeerAuth

__all__ = ["PEER_HEADER", "ClusterError", "ClusterNode", "PeerAuth", "PeerAuthError"]
