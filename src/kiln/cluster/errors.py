"""The cluster package's exceptions (root: :class:`ClusterError`)."""

from __future__ import annotations


class ClusterError(Exception):
    """Something about the nodes of a shared store went wrong."""


class PeerAuthError(ClusterError):
    """A request claims to come from another node but its signature does not hold."""
