"""The MCP tools: each one a typed function over kiln's async SDK.

The MCP SDK turns each function's signature into the tool's input schema (and
validates arguments against it) and its return type into the output schema, so
the annotations and ``Field`` descriptions below are what an agent reads.

Errors: a :class:`~kiln.sdk.KilnError` (unknown sandbox, bad input, daemon
unreachable, ...) or a ``ValueError`` from the SDK's own checks becomes a
``ToolError``, which the client receives as an ``isError`` result carrying
kiln's message; the server keeps serving.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal, ParamSpec, TypeVar

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln import __version__
from kiln.sdk import AsyncKiln, Exit, KilnError, NetworkPolicy

from . import results
from .bounds import clip_middle, decode_text, last_lines, utf8_boundary

P = ParamSpec("P")
R = TypeVar("R")
_Tool = Callable[..., Awaitable[BaseModel]]

#: Default and ceiling of the output a tool returns, per stream or file. About
#: 5,000 tokens by default: enough for a build's errors, not a flooded context.
DEFAULT_OUTPUT = 20_000
MAX_OUTPUT = 200_000
DEFAULT_FILE_BYTES = 100_000
MAX_FILE_BYTES = 1_000_000
DEFAULT_ENTRIES = 500
#: A process's output read while waiting is kept to this much (its tail).
MAX_OUTPUT_WINDOW = 4 * 1024 * 1024

INSTRUCTIONS = """\
kiln runs sandboxes: isolated Linux machines (microVMs or containers) on the \
kiln daemon's host. Create one with create_sandbox, then run commands in it with \
exec (a shell command line or an argv list; working directory /workspace by \
default). Start servers and other long commands with start_process and read \
their output with read_process_output. Read, write and list files with \
read_file, write_file and list_files. publish_port gives a URL for a port a \
server listens on (unpublish_port withdraws it). Sandboxes are addressed by id \
or name. Destroy a sandbox with destroy_sandbox when it is no longer needed.
"""

SandboxRef = Annotated[str, Field(min_length=1, description="The sandbox's id or name.")]
Command = Annotated[
    str | list[str],
    Field(
        description="A command line run by `sh -c` (pipes, &&, globs work), "
        "or an argv list run without a shell."
    ),
]
Cwd = Annotated[
    str | None, Field(description="Working directory inside the sandbox [default: /workspace].")
]
Env = Annotated[dict[str, str] | None, Field(description="Extra environment variables.")]
AsRoot = Annotated[
    bool, Field(description="Run as root instead of the sandbox's unprivileged user.")
]
Pid = Annotated[int, Field(ge=1, description="The process id start_process returned.")]


class EgressPolicy(BaseModel):
    """Where a new sandbox may connect outside kiln: the first match decides, in the
    order allow, deny, then egress."""

    model_config = ConfigDict(extra="forbid")

    egress: Literal["allow", "deny"] = Field(
        "allow", description="For destinations neither list matches [default: allow]."
    )
    allow: list[str] = Field(
        default_factory=list, description="IPv4 CIDRs or domain names it may reach."
    )
    deny: list[str] = Field(
        default_factory=list, description="IPv4 CIDRs or domain names it may not reach."
    )

    def policy(self) -> NetworkPolicy:
        return NetworkPolicy(self.egress, allow=tuple(self.allow), deny=tuple(self.deny))


_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_CHANGES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
_DESTROYS = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
# A command can do anything inside its sandbox, the network included.
_RUNS = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True)


def kiln_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Report kiln's errors to the agent as tool errors, with kiln's message."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except KilnError as exc:
            raise ToolError(str(exc)) from exc
        except ValidationError:
            raise  # a bug here, not the agent's input: reported as a crash
        except ValueError as exc:  # the SDK's own argument checks
            raise ToolError(str(exc)) from exc

    return wrapper


def build_server(kiln: AsyncKiln) -> MCPServer:
    """An MCP server whose tools act through ``kiln``."""
    server: MCPServer = MCPServer(
        "kiln", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING"
    )

    def tool(annotations: ToolAnnotations, name: str | None = None) -> Callable[[_Tool], _Tool]:
        def register(fn: _Tool) -> _Tool:
            wrapped = kiln_errors(fn)
            server.add_tool(wrapped, name=name, annotations=annotations, structured_output=True)
            return wrapped

        return register

    # -- sandboxes ----------------------------------------------------------------------

    @tool(_CHANGES)
    async def create_sandbox(
        *,
        name: Annotated[
            str | None, Field(description="A name to address it by [default: generated].")
        ] = None,
        image: Annotated[str | None, Field(description="Image [default: the daemon's].")] = None,
        cpus: Annotated[int | None, Field(ge=1, le=64, description="vCPUs [default: 1].")] = None,
        memory_mb: Annotated[
            int | None, Field(ge=64, description="Memory in MiB [default: 512].")
        ] = None,
        env: Annotated[
            dict[str, str] | None, Field(description="Environment of every command in it.")
        ] = None,
        labels: Annotated[
            dict[str, str] | None, Field(description="Labels to find it by (list_sandboxes).")
        ] = None,
        ttl_s: Annotated[
            float | None,
            Field(gt=0, description="Destroy it after this many seconds [default: never]."),
        ] = None,
        engine: Annotated[
            Literal["qemu", "docker"] | None,
            Field(description="qemu: a microVM; docker: a container [default: the daemon's]."),
        ] = None,
        secrets: Annotated[
            list[str] | None,
            Field(
                description="Names of your kiln secrets: each one's value joins its "
                "environment under that name."
            ),
        ] = None,
        template: Annotated[
            str | None,
            Field(
                min_length=1,
                description="The id or name of one of your kiln templates to start from "
                "(the other arguments override its settings).",
            ),
        ] = None,
        network: Annotated[
            EgressPolicy | None,
            Field(
                description="Its egress policy, e.g. {egress: deny, allow: [pypi.org]} to "
                "reach PyPI only [default: the daemon's]. The host, cloud metadata and "
                "other sandboxes are never reachable."
            ),
        ] = None,
    ) -> results.Sandbox:
        """Create a sandbox and wait until it runs. Returns its id and name."""
        sandbox = await kiln.sandboxes.create(
            name=name,
            image=image,
            cpus=cpus,
            memory_mb=memory_mb,
            env=env,
            secrets=secrets,
            template=template,
            labels=labels,
            ttl_s=ttl_s,
            engine=engine,
            network=network.policy() if network is not None else None,
            keep=True,
        )
        return results.Sandbox.of(sandbox)

    @tool(_READ_ONLY)
    async def list_sandboxes(
        *,
        labels: Annotated[
            dict[str, str] | None, Field(description="Only sandboxes carrying all these labels.")
        ] = None,
    ) -> results.SandboxList:
        """List your sandboxes (does not wake sleeping ones)."""
        found = await kiln.sandboxes.list(labels=labels)
        return results.SandboxList(sandboxes=[results.Sandbox.of(s) for s in found])

    @tool(_DESTROYS)
    async def destroy_sandbox(sandbox: SandboxRef) -> results.Destroyed:
        """Destroy a sandbox: its processes, files and published ports are gone."""
        await kiln.sandboxes.delete(sandbox)
        return results.Destroyed(destroyed=sandbox)

    # -- commands -----------------------------------------------------------------------

    @tool(_RUNS, name="exec")
    async def exec_(
        *,
        sandbox: SandboxRef,
        command: Command,
        cwd: Cwd = None,
        env: Env = None,
        as_root: AsRoot = False,
        timeout_s: Annotated[
            float,
            Field(gt=0, le=3600, description="Kill the command after this many seconds."),
        ] = 60,
        max_output_chars: Annotated[
            int,
            Field(
                ge=100,
                le=MAX_OUTPUT,
                description="Longer stdout or stderr loses its middle.",
            ),
        ] = DEFAULT_OUTPUT,
    ) -> results.ExecOutput:
        """Run a command in a sandbox and wait for it to finish; returns its exit code,
        stdout and stderr. For servers and other commands that do not end, use
        start_process instead."""
        result = await kiln.sandboxes.ref(sandbox).exec(
            command, cwd=cwd, env=env, timeout_s=timeout_s, user="root" if as_root else None
        )
        stdout, stdout_cut = clip_middle(result.stdout, max_output_chars)
        stderr, stderr_cut = clip_middle(result.stderr, max_output_chars)
        return results.ExecOutput(
            exit_code=result.exit_code,
            stdout=stdout,
            stderr=stderr,
            timed_out=result.timed_out,
            stdout_truncated=stdout_cut,
            stderr_truncated=stderr_cut,
        )

    # -- background processes -----------------------------------------------------------

    @tool(_RUNS)
    async def start_process(
        *,
        sandbox: SandboxRef,
        command: Command,
        cwd: Cwd = None,
        env: Env = None,
        as_root: AsRoot = False,
    ) -> results.Process:
        """Start a command in the background (a server, a watcher, a long build) and
        return its pid at once. It runs until it exits or is killed; read its output
        with read_process_output."""
        process = await kiln.sandboxes.ref(sandbox).processes.start(
            command, cwd=cwd, env=env, user="root" if as_root else None
        )
        return results.Process.of(process.info)

    @tool(_READ_ONLY)
    async def list_processes(sandbox: SandboxRef) -> results.ProcessList:
        """List a sandbox's background processes, running and recently finished."""
        found = await kiln.sandboxes.ref(sandbox).processes.list()
        return results.ProcessList(processes=[results.Process.of(p.info) for p in found])

    @tool(_READ_ONLY)
    async def read_process_output(
        *,
        sandbox: SandboxRef,
        pid: Pid,
        offset: Annotated[
            int,
            Field(ge=0, description="Byte offset to read from: 0, or the last next_offset."),
        ] = 0,
        tail_lines: Annotated[
            int | None,
            Field(ge=1, description="Instead of reading from offset: the last this many lines."),
        ] = None,
        wait_s: Annotated[
            float,
            Field(
                ge=0,
                le=300,
                description="Wait up to this many seconds for the process to exit first"
                " (returns sooner once max_bytes of output are there).",
            ),
        ] = 0,
        max_bytes: Annotated[
            int, Field(ge=100, le=MAX_OUTPUT, description="Return at most this much output.")
        ] = DEFAULT_OUTPUT,
    ) -> results.ProcessOutput:
        """Read a background process's output (stdout and stderr interleaved, the last
        1 MiB of each kept) from a byte offset, or its last lines; and whether it still
        runs. Call again with offset=next_offset to read what came since."""
        processes = kiln.sandboxes.ref(sandbox).processes
        window = bytearray()
        dropped = 0  # bytes dropped from window's front to bound memory while waiting
        want = None if tail_lines is not None else offset + max_bytes + 1
        async with processes.output(pid, follow=wait_s > 0) as events:
            # Inside the stream's block: closing it (detaching) must not be cancelled too.
            with anyio.move_on_after(wait_s if wait_s > 0 else None):
                async for event in events:
                    if isinstance(event, Exit):
                        break
                    window += event.data
                    if want is not None and dropped + len(window) >= want:
                        break
                    if len(window) > MAX_OUTPUT_WINDOW:
                        cut = len(window) - MAX_OUTPUT_WINDOW // 2
                        del window[:cut]
                        dropped += cut
        info = (await processes.get(pid)).info
        total = dropped + len(window)
        note = None
        if tail_lines is not None:
            text = last_lines(window.decode("utf-8", "replace"), tail_lines)
            data = text.encode()
            if len(data) > max_bytes:
                data = data[len(data) - max_bytes :]
                note = f"the last {tail_lines} lines are longer than max_bytes: their end is shown"
            start = total - len(data)
        else:
            start = offset
            if offset > total:
                data = b""
                note = f"offset {offset} is past the output kept ({total} bytes)"
                start = total
            else:
                begin = offset - dropped
                end = utf8_boundary(window, begin + max_bytes)
                data = bytes(window[begin:end])
        next_offset = start + len(data)
        return results.ProcessOutput(
            output=data.decode("utf-8", "replace"),
            offset=start,
            next_offset=next_offset,
            more=total > next_offset,
            running=info.running,
            exit_code=info.exit_code,
            note=note,
        )

    @tool(_CHANGES)
    async def send_process_input(
        *,
        sandbox: SandboxRef,
        pid: Pid,
        data: Annotated[str, Field(description="Text for its stdin (add \\n to end a line).")],
        close_stdin: Annotated[
            bool, Field(description="Close its stdin afterwards (end of input).")
        ] = False,
    ) -> results.InputSent:
        """Write to a background process's stdin."""
        raw = data.encode()
        await kiln.sandboxes.ref(sandbox).processes.stdin(pid, raw, close=close_stdin)
        return results.InputSent(pid=pid, bytes_sent=len(raw), stdin_closed=close_stdin)

    @tool(_DESTROYS)
    async def kill_process(
        *,
        sandbox: SandboxRef,
        pid: Pid,
        signal: Annotated[
            Literal["TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2"],
            Field(description="The signal, sent to its whole process group."),
        ] = "KILL",
    ) -> results.Signalled:
        """Stop a background process (SIGKILL by default; TERM lets it clean up)."""
        await kiln.sandboxes.ref(sandbox).processes.signal(pid, signal)
        return results.Signalled(pid=pid, signal=signal)

    # -- files --------------------------------------------------------------------------

    @tool(_READ_ONLY)
    async def read_file(
        *,
        sandbox: SandboxRef,
        path: Annotated[str, Field(min_length=1, description="Absolute, or under /workspace.")],
        start_line: Annotated[
            int | None, Field(ge=1, description="First line to read (1-based).")
        ] = None,
        max_lines: Annotated[int | None, Field(ge=1, description="Lines to read.")] = None,
        max_bytes: Annotated[
            int, Field(ge=1, le=MAX_FILE_BYTES, description="Read at most this many bytes.")
        ] = DEFAULT_FILE_BYTES,
    ) -> results.FileText:
        """Read a text file from a sandbox (whole, or some of its lines)."""
        content = await kiln.sandboxes.ref(sandbox).files.read(
            path, offset=start_line or 0, limit=max_lines or 0, max_bytes=max_bytes
        )
        text = decode_text(content.data, complete=not content.truncated)
        if text is None:
            return results.FileText(
                path=path,
                content="",
                size=content.size,
                truncated=content.truncated,
                binary=True,
                note=f"binary file ({content.size} bytes), not shown: inspect it with exec "
                f"(file, xxd {path} | head, base64)",
            )
        note = None
        if content.truncated and len(content.data) >= max_bytes:
            note = (
                f"cut at max_bytes: {len(content.data)} of {content.size} bytes read; "
                "read on with start_line/max_lines, or raise max_bytes"
            )
        return results.FileText(
            path=path,
            content=text,
            size=content.size,
            truncated=content.truncated,
            binary=False,
            note=note,
        )

    @tool(_CHANGES)
    async def write_file(
        *,
        sandbox: SandboxRef,
        path: Annotated[str, Field(min_length=1, description="Absolute, or under /workspace.")],
        content: Annotated[str, Field(description="The whole new content (UTF-8 text).")],
        mode: Annotated[
            str | None, Field(description="Octal permissions such as 644 or 755.")
        ] = None,
    ) -> results.FileWritten:
        """Create or replace a file in a sandbox (atomically; parent directories are made)."""
        data = content.encode()
        await kiln.sandboxes.ref(sandbox).files.write(path, data, mode=mode)
        return results.FileWritten(path=path, bytes_written=len(data))

    @tool(_READ_ONLY)
    async def list_files(
        *,
        sandbox: SandboxRef,
        path: Annotated[str, Field(min_length=1, description="A directory.")] = "/workspace",
        max_entries: Annotated[
            int, Field(ge=1, le=10_000, description="List at most this many entries.")
        ] = DEFAULT_ENTRIES,
    ) -> results.FileListing:
        """List a directory in a sandbox, sorted by name."""
        listing = await kiln.sandboxes.ref(sandbox).files.ls(path)
        entries = [results.FileEntry.of(e) for e in listing.entries[:max_entries]]
        return results.FileListing(
            path=path,
            entries=entries,
            total=listing.total,
            truncated=listing.truncated or len(listing.entries) > max_entries,
        )

    # -- ports --------------------------------------------------------------------------

    @tool(_CHANGES)
    async def publish_port(
        *,
        sandbox: SandboxRef,
        port: Annotated[int, Field(ge=1, le=65535, description="A TCP port in the sandbox.")],
        alias: Annotated[
            str | None,
            Field(description="The URL's first DNS label [default: <sandbox name>-<port>]."),
        ] = None,
    ) -> results.Published:
        """Publish a sandbox's port: returns a URL anyone who can reach the kiln daemon
        can open without an API key (nothing needs to listen yet)."""
        url = await kiln.sandboxes.ref(sandbox).publish(port, alias=alias)
        return results.Published(port=port, url=url)

    @tool(_DESTROYS)
    async def unpublish_port(
        *,
        sandbox: SandboxRef,
        port: Annotated[int, Field(ge=1, le=65535, description="A published port.")],
    ) -> results.Unpublished:
        """Withdraw a port's published URL (the server in the sandbox keeps running)."""
        await kiln.sandboxes.ref(sandbox).unpublish(port)
        return results.Unpublished(unpublished=port)

    @tool(_READ_ONLY)
    async def list_ports(sandbox: SandboxRef) -> results.Ports:
        """A sandbox's listening TCP ports (wakes it) and its published ports with their
        URLs."""
        ref = kiln.sandboxes.ref(sandbox)
        listening = await ref.ports()
        published = await ref.published()
        return results.Ports(
            listening=[results.ListeningPort.of(p) for p in listening],
            published=[results.PublishedEntry.of(p) for p in published],
        )

    return server
