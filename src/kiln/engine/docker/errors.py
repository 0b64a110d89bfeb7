"""Errors of kiln's private dockerd (the Docker engine's errors are kiln.engine's)::

    DockerdError (kiln.engine.EngineUnavailable)
    ├── DockerdNotInstalled   no dockerd/containerd program (says how to install them)
    ├── DockerdStartFailed    it exited early or did not answer in time (with its log tail)
    └── DockerdUnavailable    probe(): nothing usable answers at a socket (says why)

A bad :class:`~.config.DockerdConfig` raises ``ValueError`` on construction.
"""

from __future__ import annotations

from ..errors import EngineUnavailable


class DockerdError(EngineUnavailable):
    """Root of this package's errors: kiln's dockerd cannot be started or used."""


class DockerdNotInstalled(DockerdError):
    """There is no dockerd (or containerd) to start."""


class DockerdStartFailed(DockerdError):
    """dockerd or containerd exited while starting, or did not answer in time."""


class DockerdUnavailable(DockerdError):
    """Nothing usable answers at the socket: not running, refusing, or lacking a runtime."""
