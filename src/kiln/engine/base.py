"""The engine interface: what every sandbox engine (QEMU, Docker, fake) implements.

The daemon only ever talks to an :class:`Engine`. Everything that happens
inside a sandbox (exec, TTY sessions, files, activity, port forwarding) goes
through the guest agent, so an engine hands out an :class:`AgentClient` for a
sandbox it has made hot, instead of re-declaring the agent's API.

Thermal states: ``hot`` (running) → ``warm`` (vCPUs paused) → ``cold``
(snapshot on disk, no process). ``ensure_hot`` brings a sandbox back from any
of them; callers never need to know which state it was in. Which operation is
allowed in which state, and what it leads to, is :mod:`.states`' table.
"""

from __future__ import annotations

import base64
import builtins
import posixpath
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from kiln.agent_client import AgentClient
from kiln.network.policy import NetworkPolicy

from .boots import LastBoot
from .errors import InvalidSpec
from .states import State, Status, Thermal

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
#: A sandbox id names its directory and its machine: nothing that could leave them.
SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOSTNAME_BAD = re.compile(r"[^A-Za-z0-9.-]")
MIN_MEMORY_MB = 128
MAX_CPUS = 64


def guest_hostname(name: str) -> str:
    """A valid host name from a sandbox name (which may contain ``_``)."""
    host = _HOSTNAME_BAD.sub("-", name).strip(".-")[:63]
    return host or "sandbox"


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A file the guest agent writes at boot (from the config drive)."""

    path: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    """A named persistent disk attached at ``mount``.

    ``size_mb`` set means "create it first" (a new volume); otherwise it must exist.
    """

    name: str
    mount: str
    size_mb: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    sandbox_id: str
    name: str
    cpus: int = 1
    memory_mb: int = 512
    image: str = "minimal"
    env: Mapping[str, str] = field(default_factory=dict)
    files: tuple[FileSpec, ...] = ()
    init: str | None = None
    volumes: tuple[VolumeSpec, ...] = ()
    keep_hot: bool = False
    #: Which engine runs it (a :class:`~kiln.engine.router.Engines` picks by this; None:
    #: the default). An engine given a spec for another engine refuses it.
    engine: str | None = None
    #: The engine's variant, where it has several (Docker: ``runc`` or ``runsc``); None:
    #: the engine's default.
    runtime: str | None = None
    #: Whose sandbox it is: sandboxes of one owner may reach each other, no others.
    owner: str = ""
    #: Where it may connect outside kiln; None: the daemon's default policy.
    network: NetworkPolicy | None = None
    #: The guest's default user for commands and files (created at boot when the image
    #: lacks it); None: the image's own sandbox user.
    user: str | None = None
    #: The default working directory of its commands (an image's WORKDIR); None:
    #: /workspace.
    workdir: str | None = None
    #: Create it from this saved image (:meth:`Engine.save_image`'s ``image_id``), not
    #: from ``image`` alone; ``image``, ``cpus`` and ``memory_mb`` then must be the saved
    #: image's (the tier it came from gives the kernel, the shape is in its memory).
    snapshot: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-able, for an engine's own records (:meth:`from_json` reads it back)."""
        return {
            "sandbox_id": self.sandbox_id,
            "name": self.name,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "image": self.image,
            "env": dict(self.env),
            "files": [
                {"path": f.path, "content": base64.b64encode(f.content).decode(), "mode": f.mode}
                for f in self.files
            ],
            "init": self.init,
            "volumes": [asdict(v) for v in self.volumes],
            "keep_hot": self.keep_hot,
            "engine": self.engine,
            "runtime": self.runtime,
            "owner": self.owner,
            "network": None if self.network is None else self.network.to_json(),
            "user": self.user,
            "workdir": self.workdir,
            "snapshot": self.snapshot,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxSpec:
        return cls(
            sandbox_id=str(data["sandbox_id"]),
            name=str(data["name"]),
            cpus=int(data.get("cpus", 1)),
            memory_mb=int(data.get("memory_mb", 512)),
            image=str(data.get("image", "minimal")),
            env=dict(data.get("env") or {}),
            files=tuple(
                FileSpec(f["path"], base64.b64decode(f["content"]), int(f.get("mode", 0o644)))
                for f in data.get("files") or []
            ),
            init=data.get("init"),
            volumes=tuple(VolumeSpec(**v) for v in data.get("volumes") or []),
            keep_hot=bool(data.get("keep_hot", False)),
            engine=data.get("engine"),
            runtime=data.get("runtime"),
            owner=str(data.get("owner") or ""),
            network=None
            if data.get("network") is None
            else NetworkPolicy.from_json(data["network"]),
            user=data.get("user"),
            workdir=data.get("workdir"),
            snapshot=data.get("snapshot"),
        )

    def guest_config(self, token: str) -> dict[str, Any]:
        """What every engine's guest agent config (:mod:`kiln.guest.config`) holds of the
        spec; each engine adds its own machine's keys (network, volumes, ...)."""
        config: dict[str, Any] = {
            "sandbox_id": self.sandbox_id,
            "token": token,
            "env": dict(self.env),
            "files": [
                {
                    "path": f.path,
                    "content": base64.b64encode(f.content).decode(),
                    "mode": f"{f.mode & 0o7777:04o}",
                }
                for f in self.files
            ],
        }
        if self.init:
            config["init"] = self.init
        if self.user:
            config["user"] = self.user
        if self.workdir:
            config["workdir"] = self.workdir
        return config

    def validate(self) -> None:
        """Reject a bad spec with a clear message before any resource is touched."""
        if not SANDBOX_ID_RE.match(self.sandbox_id):
            raise InvalidSpec(
                f"invalid sandbox id {self.sandbox_id!r} (letters, digits, '.', '_', '-')"
            )
        if not NAME_RE.match(self.name):
            raise InvalidSpec(f"invalid sandbox name {self.name!r}")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise InvalidSpec(f"cpus must be within 1..{MAX_CPUS}, got {self.cpus}")
        if self.memory_mb < MIN_MEMORY_MB:
            raise InvalidSpec(f"memory_mb must be at least {MIN_MEMORY_MB}, got {self.memory_mb}")
        for key in self.env:
            if not key or "=" in key or "\x00" in key:
                raise InvalidSpec(f"invalid environment variable name {key!r}")
        mounts: set[str] = set()
        for vol in self.volumes:
            if not NAME_RE.match(vol.name):
                raise InvalidSpec(f"invalid volume name {vol.name!r}")
            if not vol.mount.startswith("/") or vol.mount == "/":
                raise InvalidSpec(f"volume mount point must be an absolute path, got {vol.mount!r}")
            if vol.mount in mounts:
                raise InvalidSpec(f"two volumes mounted at {vol.mount}")
            mounts.add(vol.mount)
            if vol.size_mb is not None and vol.size_mb < 1:
                raise InvalidSpec(f"volume {vol.name!r}: size_mb must be positive")
        if self.user is not None and not USER_NAME_RE.match(self.user):
            raise InvalidSpec(f"invalid user name {self.user!r}")
        if self.workdir is not None and not is_workdir(self.workdir):
            raise InvalidSpec(f"invalid working directory {self.workdir!r} (an absolute path)")
        if self.snapshot is not None:
            if not SANDBOX_ID_RE.match(self.snapshot):
                raise InvalidSpec(f"invalid saved image id {self.snapshot!r}")
            if self.volumes:
                raise InvalidSpec("a sandbox made from a saved image gets no volumes")


def is_workdir(path: str) -> bool:
    """An absolute, normalised path the guest can make its commands' directory."""
    return (
        path.startswith("/")
        and "\0" not in path
        and len(path) <= 1024
        and posixpath.normpath(path) == path
    )


#: A user name the guest can create (what its config drive accepts).
USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine can do with a sandbox; the layers above ask this, never an engine's name.

    It is per sandbox, because one engine can run sandboxes of different kinds
    (Docker on runc cannot checkpoint, on runsc it can).
    """

    #: hot → warm: stop its CPUs/processes and keep its memory (resumes in ms).
    pause: bool = True
    #: cold keeps the running processes (a memory snapshot or checkpoint). Without it the
    #: thermal manager never takes the sandbox cold, and the user's stop keeps its files
    #: but ends its processes (see :mod:`.states`, ``snapshots=False``).
    snapshots: bool = True
    #: ``fork``: a running copy of it (disk, memory and processes).
    fork: bool = False
    #: ``save`` can keep its memory in the new image, not only its disk.
    save_memory: bool = False


#: A VM engine: everything.
VM_CAPABILITIES = Capabilities(pause=True, snapshots=True, fork=True, save_memory=True)


@dataclass(frozen=True, slots=True)
class SavedImage:
    """A sandbox saved by :meth:`Engine.save_image`: what a create from it must match.

    Its files are the engine's (under its data directory); they survive restarts
    until :meth:`Engine.delete_saved_image`.
    """

    image_id: str
    engine: str
    #: The image tier the saved sandbox was made from (kernel, base disk).
    image: str
    cpus: int
    memory_mb: int
    runtime: str | None
    #: Bytes its files take on the host.
    size_bytes: int
    #: It holds the sandbox's memory too: a sandbox made from it starts with the saved
    #: one's processes running (``Capabilities.save_memory``); else only its files.
    memory: bool
    created_at: float

    def spec_fields(self) -> dict[str, Any]:
        """The :class:`SandboxSpec` fields a sandbox made from it has."""
        return {
            "image": self.image,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "engine": self.engine,
            "runtime": self.runtime,
            "snapshot": self.image_id,
        }


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    sandbox_id: str
    name: str
    engine: str
    image: str
    status: Status
    thermal: Thermal
    ip: str | None
    cpus: int
    memory_mb: int
    keep_hot: bool = False
    has_snapshot: bool = False
    capabilities: Capabilities = VM_CAPABILITIES
    runtime: str | None = None
    #: How its current (or, when cold, its last) machine was brought up.
    last_boot: LastBoot | None = None
    #: Why it is in error or unknown, when the engine knows (e.g. its disk is gone).
    problem: str | None = None

    @property
    def state(self) -> State:
        return State(self.status, self.thermal)

    @classmethod
    def of(
        cls, spec: SandboxSpec, engine: str, state: State, ip: str | None, **more: Any
    ) -> SandboxInfo:
        """The info of a sandbox made from ``spec``, in ``state``."""
        return cls(
            sandbox_id=spec.sandbox_id,
            name=spec.name,
            engine=engine,
            image=spec.image,
            status=state.status,
            thermal=state.thermal,
            ip=ip,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            keep_hot=spec.keep_hot,
            **more,
        )


@runtime_checkable
class Engine(Protocol):
    """A sandbox engine. All methods raise only :class:`kiln.engine.errors.EngineError`."""

    name: str

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        """Validate ``spec``, boot the sandbox and return once its agent answers."""
        ...

    async def destroy(self, sandbox_id: str) -> None:
        """Stop it whatever its state and free everything (IP, TAP, files). Idempotent."""
        ...

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        """Snapshot to disk and release its memory (thermal ``cold``; ``Op.COOL``).

        The user's stop and the thermal manager's cold step both call this; that a
        user stopped it is the store's to record (``Op.STOP``)."""
        ...

    async def start(self, sandbox_id: str) -> SandboxInfo:
        """Restore from the snapshot (thermal ``hot``; ``Op.START``)."""
        ...

    async def pause(self, sandbox_id: str) -> None:
        """hot → warm (vCPUs stopped)."""
        ...

    async def resume(self, sandbox_id: str) -> None:
        """warm → hot; sets the guest clock."""
        ...

    async def ensure_hot(self, sandbox_id: str) -> None:
        """Make the sandbox hot from whatever state it is in."""
        ...

    async def fork(self, source_id: str, spec: SandboxSpec) -> SandboxInfo:
        """A new sandbox (``spec``: its id, name and owner, the source's shape, image
        and env) whose disk, memory and processes are a copy of ``source_id``'s now,
        with its own identity (address, MAC, hostname, token, RNG, clock); both go on
        independently. InvalidState where the sandbox cannot be forked (volumes
        attached, or ``capabilities.fork`` is false)."""
        ...

    def thermal(self, sandbox_id: str) -> Thermal: ...

    def info(self, sandbox_id: str) -> SandboxInfo: ...

    def list(self) -> list[SandboxInfo]: ...

    async def agent(self, sandbox_id: str) -> AgentClient:
        """Make the sandbox hot and return a client for its guest agent."""
        ...

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        """JSON-able state the daemon stores to recover this sandbox after a crash."""
        ...

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        """Re-adopt a sandbox from exported state (daemon recovery)."""
        ...

    async def adopt(self, state: Mapping[str, Any], *, hot: bool = True) -> SandboxInfo:
        """Take over a sandbox of a lost node of a cluster (``state``: what that node's
        :meth:`export_state` made), its files from the cluster's shared directory;
        ``hot``: a cold one is woken at once (else it stays cold where it can).
        InvalidState where it cannot move (no shared directory; an engine that keeps
        a sandbox's files where no other node reaches them)."""
        ...

    async def release(self, sandbox_id: str) -> dict[str, Any]:
        """Give a stopped (cold) sandbox up to another node of a cluster: forget it
        here (its host network goes), keep its files where that node's :meth:`adopt`
        finds them; returns the state to adopt. InvalidState when it is not cold or
        cannot move."""
        ...

    async def prepare(self, spec: SandboxSpec) -> None:
        """Do ahead of time what the first :meth:`create` of this shape would wait for
        (images, network, a template snapshot); creates nothing visible."""
        ...

    async def save_image(self, sandbox_id: str, image_id: str) -> SavedImage:
        """Save the sandbox as ``image_id`` (a :data:`SANDBOX_ID_RE` name the caller
        chose): its disk, and its memory where ``capabilities.save_memory``. The
        sandbox goes on (a hot one stands still briefly). A create whose spec has
        ``snapshot=image_id`` starts from it, with its own identity as after a fork.
        InvalidState if the id is taken or the sandbox cannot be saved (volumes)."""
        ...

    async def delete_saved_image(self, image_id: str) -> None:
        """Delete what :meth:`save_image` made. Idempotent; sandboxes made from it keep
        going (they have copies)."""
        ...

    async def cleanup_orphans(self) -> builtins.list[str]:
        """Remove what a crashed daemon left and no known sandbox owns (machines,
        network devices, files); return a line per thing removed. Call after recovery."""
        ...

    async def delete_volume(self, volume_id: str) -> None:
        """Delete the volume the engine knows as ``volume_id`` (``VolumeSpec.name``), made
        the first time a sandbox attached it. Idempotent; refuses one that is attached."""
        ...

    async def close(self) -> None:
        """Release engine-wide resources; sandboxes keep their on-disk state."""
        ...


__all__ = [
    "MAX_CPUS",
    "MIN_MEMORY_MB",
    "NAME_RE",
    "SANDBOX_ID_RE",
    "VM_CAPABILITIES",
    "Capabilities",
    "Engine",
    "FileSpec",
    "SandboxInfo",
    "SandboxSpec",
    "SavedImage",
    "Status",
    "Thermal",
    "VolumeSpec",
]
