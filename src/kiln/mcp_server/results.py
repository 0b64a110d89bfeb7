"""What the MCP tools return: pydantic models (the tools' output schemas), built
from the SDK's values by pure functions."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from kiln.protocol.messages import FileInfo
from kiln.sdk.models import NetworkPolicy, Port, ProcessInfo, PublishedPort, SandboxInfo


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


class Network(BaseModel):
    """A sandbox's egress policy, as the daemon keeps it (addresses as CIDRs)."""

    egress: str = Field(description="allow or deny: for destinations neither list matches.")
    allow: list[str]
    deny: list[str]

    @classmethod
    def of(cls, policy: NetworkPolicy) -> Network:
        return cls(egress=policy.egress, allow=list(policy.allow), deny=list(policy.deny))


class Sandbox(BaseModel):
    """A sandbox as an agent needs to see it."""

    id: str
    name: str
    status: str = Field(description="running, stopped, ...")
    engine: str
    image: str
    cpus: int
    memory_mb: int
    ip: str | None
    labels: dict[str, str]
    expires_at: str | None = Field(description="When the ttl destroys or stops it (ISO 8601).")
    network: Network | None = Field(description="Its egress policy (None: an older daemon's).")

    @classmethod
    def of(cls, info: SandboxInfo) -> Sandbox:
        return cls(
            id=info.id,
            name=info.name,
            status=info.status,
            engine=info.engine,
            image=info.image,
            cpus=info.cpus,
            memory_mb=info.memory_mb,
            ip=info.ip,
            labels=dict(info.labels),
            expires_at=_iso(info.expires_at),
            network=Network.of(info.network) if info.network is not None else None,
        )


class SandboxList(BaseModel):
    sandboxes: list[Sandbox]


class Destroyed(BaseModel):
    destroyed: str = Field(description="The id or name that was destroyed.")


class ExecOutput(BaseModel):
    """A finished command. A non-zero exit code is a result, not a tool error."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = Field(description="Killed at timeout_s (exit code 124).")
    stdout_truncated: bool = Field(description="The middle of stdout was cut to fit the limit.")
    stderr_truncated: bool = Field(description="The middle of stderr was cut to fit the limit.")


class Process(BaseModel):
    pid: int
    cmd: list[str]
    running: bool
    exit_code: int | None
    started_at: str | None
    finished_at: str | None
    tty: bool = Field(description="A terminal session rather than a background process.")

    @classmethod
    def of(cls, info: ProcessInfo) -> Process:
        return cls(
            pid=info.pid,
            cmd=list(info.cmd),
            running=info.running,
            exit_code=info.exit_code,
            started_at=_iso(info.started_at),
            finished_at=_iso(info.finished_at),
            tty=info.tty,
        )


class ProcessList(BaseModel):
    processes: list[Process]


class ProcessOutput(BaseModel):
    """A slice of a background process's output (stdout and stderr interleaved)."""

    output: str
    offset: int = Field(description="Byte offset of the first byte of `output`.")
    next_offset: int = Field(description="Pass this as `offset` to read on from here.")
    more: bool = Field(description="More output is already there past next_offset.")
    running: bool
    exit_code: int | None
    note: str | None = None


class InputSent(BaseModel):
    pid: int
    bytes_sent: int
    stdin_closed: bool


class Signalled(BaseModel):
    pid: int
    signal: str


class FileText(BaseModel):
    """A file's content as text, or a note saying why it is not shown (whole or in part)."""

    path: str
    content: str
    size: int = Field(description="The whole file's size in bytes.")
    truncated: bool = Field(description="`content` is only part of what was asked for.")
    binary: bool = Field(description="Not UTF-8 text: `content` is empty.")
    note: str | None = None


class FileWritten(BaseModel):
    path: str
    bytes_written: int


class FileEntry(BaseModel):
    name: str
    type: str = Field(description="dir or file.")
    size: int
    mode: str
    modified: str | None

    @classmethod
    def of(cls, info: FileInfo) -> FileEntry:
        modified = datetime.fromtimestamp(info.mtime, UTC).isoformat() if info.mtime else None
        return cls(
            name=info.name,
            type="dir" if info.is_dir else "file",
            size=info.size,
            mode=info.mode,
            modified=modified,
        )


class FileListing(BaseModel):
    path: str
    entries: list[FileEntry]
    total: int = Field(description="How many entries the directory has.")
    truncated: bool = Field(description="Only the first entries (by name) are listed.")


class Published(BaseModel):
    port: int
    url: str = Field(description="Reachable without an API key; a request wakes the sandbox.")


class Unpublished(BaseModel):
    unpublished: int = Field(description="The port whose URL no longer works.")


class ListeningPort(BaseModel):
    port: int
    published_url: str | None

    @classmethod
    def of(cls, port: Port) -> ListeningPort:
        return cls(port=port.port, published_url=port.published_url)


class PublishedEntry(BaseModel):
    port: int
    alias: str
    url: str

    @classmethod
    def of(cls, port: PublishedPort) -> PublishedEntry:
        return cls(port=port.port, alias=port.alias, url=port.url)


class Ports(BaseModel):
    listening: list[ListeningPort] = Field(description="TCP ports something listens on now.")
    published: list[PublishedEntry] = Field(description="Ports published with publish_port.")
