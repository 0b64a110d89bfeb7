"""The cluster's relay: any node answers for any sandbox.

front   the ASGI front: finds the sandbox a request addresses and, when it lives on
        another node, relays the request there (or refuses: 401, 421, 502, 503)
locate  which sandbox a request addresses (paths, E2B's headers, published hosts)
http    one HTTP exchange to another node, streamed both ways
peers   kept connections to the other nodes, one pool per node
"""

from .front import NODE_HEADER, RelayFront
from .peers import NodePools

__all__ = ["NODE_HEADER", "NodePools", "RelayFront"]
