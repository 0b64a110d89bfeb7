"""``/sandboxes/{id}/processes``: background commands, detached from any connection.

A process started here runs until it exits or is signalled, whoever reads its
output; the agent keeps the last 1 MiB of its stdout and of its stderr for
readers that come later. Every call wakes the sandbox first (like exec).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from kiln.agent_client import AgentError, ProcessOutput, Stderr, Stdout
from kiln.api.requests import ResizeProcess, SignalProcess, StartProcess, agent_user
from kiln.api.responses import ErrorBody, ExecEvent
from kiln.api.responses import ProcessInfo as ProcessInfoBody
from kiln.protocol import InvalidMessage, ProcessInfo, signal_name
from kiln.store import rfc3339

from ..errors import NotFoundError, Unprocessable, to_api_error
from ..openapi import NDJSON, ndjson
from ..streaming import LiveStream, keep_active
from .deps import AppServices, CurrentUser
from .exec import _Decoder, _line

router = APIRouter(tags=["processes"])
log = logging.getLogger("kiln.server")

#: Pids the guest kernel can hand out (pid_max is at most 2^22; any int32 is safe to ask).
MAX_PID = (1 << 31) - 1
#: Besides the usual errors, the agent's own failures answer 502 and 504.
_AGENT_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorBody, "description": "The sandbox's agent failed or is unreachable"},
    504: {"model": ErrorBody, "description": "The sandbox's agent did not answer in time"},
}

PidPath = Annotated[int, Path(description="The guest pid of the process")]


def process_view(info: ProcessInfo) -> dict[str, Any]:
    """A process table entry as the API returns it (times in RFC 3339)."""
    return {
        "pid": info.pid,
        "cmd": list(info.cmd),
        "running": info.running,
        "exit_code": info.exit_code,
        "started_at": rfc3339(info.started_at),
        "finished_at": None if info.finished_at is None else rfc3339(info.finished_at),
        "tty": info.tty,
        "session_id": info.session_id,
        "user": info.user,
        "tag": info.tag,
        "cwd": info.cwd,
    }


def _pid(pid: int) -> int:
    # Not a 400: a pid that cannot exist is simply not in the table.
    if not 1 <= pid <= MAX_PID:
        raise NotFoundError(f"no process with pid {pid}")
    return pid


@router.post(
    "/sandboxes/{sandbox}/processes",
    status_code=201,
    response_model=ProcessInfoBody,
    responses=_AGENT_ERRORS,
)
async def start_process(
    sandbox: str, body: StartProcess, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """Start a command detached from this request; 400 when it cannot start
    (not found, not executable, bad cwd)."""
    sb, client = await services.sandboxes.agent(user, sandbox)
    run_as = agent_user(body.user)
    info = await client.start_process(
        body.cmd,
        env=body.env,
        cwd=body.cwd,
        user=run_as,
        stdin=body.stdin,
        tag=body.tag,
        tty=body.tty,
        rows=body.rows,
        cols=body.cols,
    )
    services.sandboxes.touch(sb.id)
    return process_view(info)


@router.get(
    "/sandboxes/{sandbox}/processes",
    response_model=list[ProcessInfoBody],
    responses=_AGENT_ERRORS,
)
async def list_processes(
    sandbox: str, user: CurrentUser, services: AppServices
) -> list[dict[str, Any]]:
    """Background processes and TTY sessions, running and recently finished."""
    _, client = await services.sandboxes.agent(user, sandbox)
    return [process_view(p) for p in await client.list_processes()]


@router.get(
    "/sandboxes/{sandbox}/processes/{pid}",
    response_model=ProcessInfoBody,
    responses=_AGENT_ERRORS,
)
async def get_process(
    sandbox: str, pid: PidPath, user: CurrentUser, services: AppServices
) -> dict[str, Any]:
    """One process by its guest pid (404 if not in the table)."""
    _, client = await services.sandboxes.agent(user, sandbox)
    return process_view(await client.get_process(_pid(pid)))


@router.get(
    "/sandboxes/{sandbox}/processes/{pid}/output",
    responses={**ndjson(ExecEvent, "Output events, then an exit line"), **_AGENT_ERRORS},
)
async def process_output(
    *,
    sandbox: str,
    pid: PidPath,
    user: CurrentUser,
    services: AppServices,
    encoding: Annotated[Literal["utf-8", "base64"] | None, Query()] = None,
    follow: Annotated[bool, Query()] = True,
) -> Response:
    """NDJSON as streaming exec: the kept output, then live output, then
    ``{"type":"exit","exit_code":N}``. Leaving only detaches this reader.

    ``follow=false`` stops after the output kept so far (with the exit line only
    if the process has already exited)."""
    sb, client = await services.sandboxes.agent(user, sandbox)
    reader = client.process_output(_pid(pid), replay=True, follow=follow)
    # Attached here, so an unknown pid is a proper 404 rather than a broken stream.
    await reader.__aenter__()

    def touch() -> None:
        services.sandboxes.touch(sb.id)

    async def detach() -> None:
        await reader.__aexit__(None, None, None)

    return LiveStream(
        _output_lines(reader, encoding == "base64", touch),
        media_type=NDJSON,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        on_close=detach,
    )


@router.post("/sandboxes/{sandbox}/processes/{pid}/stdin", status_code=204, responses=_AGENT_ERRORS)
async def process_stdin(
    *,
    sandbox: str,
    pid: PidPath,
    request: Request,
    user: CurrentUser,
    services: AppServices,
    close: Annotated[bool, Query()] = False,
) -> Response:
    """Write the raw request body to the process's stdin (``close=true`` closes it
    afterwards); 409 once the process has finished."""
    data = await request.body()
    sb, client = await services.sandboxes.agent(user, sandbox)
    await client.process_input(_pid(pid), data, close=close)
    services.sandboxes.touch(sb.id)
    return Response(status_code=204)


@router.post(
    "/sandboxes/{sandbox}/processes/{pid}/signal", status_code=204, responses=_AGENT_ERRORS
)
async def signal_process(
    sandbox: str, pid: PidPath, body: SignalProcess, user: CurrentUser, services: AppServices
) -> Response:
    """Send a signal (TERM, KILL, INT, HUP, QUIT, USR1, USR2) to the process's group;
    409 once it has finished."""
    try:
        name = signal_name(body.signal)
    except InvalidMessage as exc:
        raise Unprocessable(f"signal: {exc}") from None
    sb, client = await services.sandboxes.agent(user, sandbox)
    await client.signal_process(_pid(pid), name)
    services.sandboxes.touch(sb.id)
    return Response(status_code=204)


@router.post(
    "/sandboxes/{sandbox}/processes/{pid}/resize", status_code=204, responses=_AGENT_ERRORS
)
async def resize_process(
    sandbox: str, pid: PidPath, body: ResizeProcess, user: CurrentUser, services: AppServices
) -> Response:
    """Set the terminal size of a process started with ``tty`` (or a TTY session);
    409 for one without a terminal or once it has finished."""
    sb, client = await services.sandboxes.agent(user, sandbox)
    await client.resize_process(_pid(pid), body.rows, body.cols)
    services.sandboxes.touch(sb.id)
    return Response(status_code=204)


async def _output_lines(
    reader: ProcessOutput, b64: bool, touch: Callable[[], None]
) -> AsyncGenerator[bytes, None]:
    decoders = {"stdout": _Decoder(b64), "stderr": _Decoder(b64)}
    extra = {"encoding": "base64"} if b64 else {}

    def tails() -> list[bytes]:
        out = []
        for kind, dec in decoders.items():
            tail = dec.text(b"", True)
            if tail:
                out.append(_line({"type": kind, "data": tail}))
        return out

    async with keep_active(touch):
        try:
            async for event in reader:
                if isinstance(event, Stdout | Stderr):
                    kind = "stdout" if isinstance(event, Stdout) else "stderr"
                    text = decoders[kind].text(event.data)
                    if text:
                        yield _line({"type": kind, "data": text, **extra})
                    continue
                for line in tails():
                    yield line
                yield _line({"type": "exit", "exit_code": event.code})
                return
            for line in tails():  # follow=false on a running process: all that is kept
                yield line
        except AgentError as exc:
            api = to_api_error(exc)
            message = api.message if api is not None else str(exc)
            log.info("process output stream failed: %s", message)
            yield _line({"type": "error", "error": message})
