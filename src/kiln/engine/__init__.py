"""Sandbox engines: the interface (:mod:`.base`) and one subpackage per engine."""

from .base import (
    Engine,
    FileSpec,
    SandboxInfo,
    SandboxSpec,
    Status,
    Thermal,
    VolumeSpec,
)
from .errors import (
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    InvalidSpec,
    InvalidState,
    SandboxCrashed,
    SandboxNotFound,
)

__all__ = [
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "FileSpec",
    "ImageNotFound",
    "InvalidSpec",
    "InvalidState",
    "SandboxCrashed",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxSpec",
    "Status",
    "Thermal",
    "VolumeSpec",
]
