"""The kiln Python SDK: sync :class:`Kiln` and async :class:`AsyncKiln` clients.

::

    from kiln.sdk import Kiln

    with Kiln() as k:                      # URL/key from KILN_URL/KILN_TOKEN or ~/.kiln/config.yaml
        sb = k.sandboxes.create(name="demo", cpus=2, memory_mb=1024, env={"DEBUG": "1"})
        result = sb.exec(["python3", "-c", "print(6 * 7)"])
        print(result.exit_code, result.stdout)

        for event in sb.exec_stream("for i in 1 2 3; do echo $i; sleep 1; done"):
            if isinstance(event, Stdout):
                print(event.text, end="")

        server = sb.processes.start("python3 -m http.server 8000")   # in the background
        print([p.pid for p in sb.processes.list()])
        print(sb.publish(8000))             # http://demo-8000.localhost:8080/, no key needed
        server.kill()
        print(server.wait())                                          # 137

        sb.files.write("/workspace/app.py", b"print('hi')\\n")
        print(sb.files.read("/workspace/app.py").text)
        sb.delete()

Errors are :class:`KilnError` subclasses (see :mod:`kiln.sdk.errors`).
"""

from typing import TYPE_CHECKING, Any

from ._async import (
    AsyncArchiveDownload,
    AsyncExecStream,
    AsyncFiles,
    AsyncFileWatch,
    AsyncImages,
    AsyncKiln,
    AsyncNodes,
    AsyncOutputStream,
    AsyncProcess,
    AsyncProcesses,
    AsyncSandbox,
    AsyncSandboxes,
    AsyncSandboxRef,
    AsyncSavedImages,
    AsyncSecrets,
    AsyncSessions,
    AsyncTemplates,
    AsyncVolumes,
)
from ._sync import (
    ArchiveDownload,
    ExecStream,
    Files,
    FileWatch,
    Images,
    Kiln,
    Nodes,
    OutputStream,
    Process,
    Processes,
    Sandbox,
    Sandboxes,
    SandboxRef,
    SavedImages,
    Secrets,
    Sessions,
    Templates,
    Volumes,
)
from .config import DEFAULT_URL, Settings, load_settings
from .errors import (
    APIError,
    AuthenticationError,
    ConfigError,
    Conflict,
    ConnectionError,
    InvalidResponse,
    KilnError,
    NotFound,
    PermissionDenied,
    ServerError,
    Timeout,
    Unavailable,
    ValidationError,
)
from .models import (
    Capabilities,
    ExecEvent,
    ExecResult,
    Exit,
    FileContent,
    FileStat,
    Health,
    ImageInfo,
    LastBoot,
    NetworkPolicy,
    NewVolume,
    NodeInfo,
    Port,
    ProcessInfo,
    PublishedPort,
    SandboxInfo,
    SavedImage,
    Secret,
    SessionInfo,
    Stderr,
    Stdout,
    Template,
    Volume,
    VolumeMount,
)

if TYPE_CHECKING:
    from kiln.protocol.fsops import FileEvent
    from kiln.protocol.messages import FileInfo, FileListing

    from .shell import AsyncShellSession, ShellSession

#: Loaded on first use: websockets (shells) and kiln.protocol (it imports asyncio)
#: are slow to import, and most programs, the CLI first, need neither at start-up.
_LAZY = {
    "ShellSession": "kiln.sdk.shell",
    "AsyncShellSession": "kiln.sdk.shell",
    "FileEvent": "kiln.protocol.fsops",
    "FileInfo": "kiln.protocol.messages",
    "FileListing": "kiln.protocol.messages",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(module), name)


__all__ = [
    "DEFAULT_URL",
    "APIError",
    "ArchiveDownload",
    "AsyncArchiveDownload",
    "AsyncExecStream",
    "AsyncFileWatch",
    "AsyncFiles",
    "AsyncImages",
    "AsyncKiln",
    "AsyncNodes",
    "AsyncOutputStream",
    "AsyncProcess",
    "AsyncProcesses",
    "AsyncSandbox",
    "AsyncSandboxRef",
    "AsyncSandboxes",
    "AsyncSavedImages",
    "AsyncSecrets",
    "AsyncSessions",
    "AsyncShellSession",
    "AsyncTemplates",
    "AsyncVolumes",
    "AuthenticationError",
    "Capabilities",
    "ConfigError",
    "Conflict",
    "ConnectionError",
    "ExecEvent",
    "ExecResult",
    "ExecStream",
    "Exit",
    "FileContent",
    "FileEvent",
    "FileInfo",
    "FileListing",
    "FileStat",
    "FileWatch",
    "Files",
    "Health",
    "ImageInfo",
    "Images",
    "InvalidResponse",
    "Kiln",
    "KilnError",
    "LastBoot",
    "NetworkPolicy",
    "NewVolume",
    "NodeInfo",
    "Nodes",
    "NotFound",
    "OutputStream",
    "PermissionDenied",
    "Port",
    "Process",
    "ProcessInfo",
    "Processes",
    "PublishedPort",
    "Sandbox",
    "SandboxInfo",
    "SandboxRef",
    "Sandboxes",
    "SavedImage",
    "SavedImages",
    "Secret",
    "Secrets",
    "ServerError",
    "SessionInfo",
    "Sessions",
    "Settings",
    "ShellSession",
    "Stderr",
    "Stdout",
    "Template",
    "Templates",
    "Timeout",
    "Unavailable",
    "ValidationError",
    "Volume",
    "VolumeMount",
    "Volumes",
    "load_settings",
]
