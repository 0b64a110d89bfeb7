"""Errors of the guest agent.

    GuestError                    root of everything kiln.guest raises
    ├── ConfigError               the config drive or kernel command line is malformed
    ├── RequestError              a host request the agent refuses; becomes an ERROR frame
    ├── SetupError                a PID 1 duty (mount, network, user) failed
    └── SpawnerUnavailable        no spawner took the command; the agent starts it itself

Protocol errors (:class:`kiln.protocol.ProtocolError`) mean the *peer* sent bytes
that are not a valid frame or message; the agent answers them with ERROR too and
closes that connection, but they are not GuestErrors: they belong to the codec.
"""

from __future__ import annotations


class GuestError(Exception):
    """Root of every error raised by :mod:`kiln.guest`."""


class ConfigError(GuestError):
    """The sandbox configuration (config drive JSON, kernel command line) is invalid."""


class RequestError(GuestError):
    """A request the agent cannot serve (unknown session, missing file, ...)."""


class SetupError(GuestError):
    """A PID 1 duty failed (mounting, configuring the network, creating the user)."""


class SpawnerUnavailable(GuestError):
    """A command did not reach a spawner (none could be started, or the request is too
    large): nothing was started, and the agent starts it with ``subprocess`` instead."""
