"""Dialing a guest agent: engine-neutral, in :mod:`kiln.engine.dial`."""

from kiln.engine.dial import agent_dialer

__all__ = ["agent_dialer"]
