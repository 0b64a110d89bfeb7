"""Errors of the wire protocol.

    ProtocolError                 root of everything this package raises
    ├── FrameTooLarge             a frame over MAX_FRAME (refused by encoder and decoder)
    ├── MalformedFrame            bytes that are not a valid frame (length 0, EOF mid-frame,
    │                             a fixed-size payload of the wrong size)
    └── InvalidMessage            a JSON payload that does not decode or has wrong fields

The split that matters to callers: FrameTooLarge raised by ``encode_frame`` means
*we* misused the codec (nothing was written); every error raised while decoding
means the *peer* misbehaved and the connection should be closed.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised by :mod:`kiln.protocol`."""


class FrameTooLarge(ProtocolError):
    """A frame longer than the protocol allows."""


class MalformedFrame(ProtocolError):
    """Bytes on the wire that do not form a valid frame."""


class InvalidMessage(ProtocolError):
    """A frame payload that does not carry the expected message."""
