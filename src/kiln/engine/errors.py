"""Errors raised by engines (every engine raises only these).

    EngineError                  root
    ├── InvalidSpec              a sandbox spec rejected before anything started
    ├── SandboxNotFound          no sandbox with that id in this engine
    ├── InvalidState             the operation does not fit the sandbox's state
    ├── SandboxCrashed           the VM/container died underneath us
    ├── ImageNotFound            the requested image tier is not built/known
    └── EngineUnavailable        the engine cannot run here (no QEMU, no Docker, ...)

Each engine translates the exceptions of the libraries it calls (QMP, netlink,
image builds) into these once, in the adapter that makes the call, chained with
``from``; ``asyncio.CancelledError`` is never wrapped. Errors of the guest agent
itself (:mod:`kiln.agent_client.errors`) reach callers of the client an engine
hands out unchanged.
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error an engine raises."""


class InvalidSpec(EngineError):
    pass


class SandboxNotFound(EngineError):
    pass


class InvalidState(EngineError):
    pass


class SandboxCrashed(EngineError):
    pass


class ImageNotFound(EngineError):
    pass


class EngineUnavailable(EngineError):
    pass
