"""``POST /sandboxes/{id}/exec``: buffered JSON, or NDJSON events as they happen."""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from kiln.agent_client import AgentClient, AgentError, ExecProcess, Exit, Stderr, Stdout
from kiln.api.requests import ExecBody, agent_user
from kiln.api.responses import ExecEvent, ExecResult

from ..errors import to_api_error
from ..openapi import NDJSON, ndjson
from ..streaming import KEEPALIVE_S, LiveStream, keep_active
from .deps import AppServices, CurrentUser

router = APIRouter(tags=["exec"])
log = logging.getLogger("kiln.server")

#: Exit code reported when ``timeout_s`` expired and the command was killed (as timeout(1)).
TIMEOUT_EXIT = 124


class _Decoder:
    """Output chunks → JSON-safe text: UTF-8 across chunk boundaries, or base64."""

    def __init__(self, base64_: bool) -> None:
        self.base64 = base64_
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def text(self, data: bytes, final: bool = False) -> str:
        if self.base64:
            return base64.b64encode(data).decode("ascii")
        return self._utf8.decode(data, final)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@router.post(
    "/sandboxes/{sandbox}/exec",
    response_model=ExecResult,
    responses=ndjson(ExecEvent, "The result; with Accept: application/x-ndjson, events"),
)
async def exec_command(
    sandbox: str, body: ExecBody, request: Request, user: CurrentUser, services: AppServices
) -> Response:
    """Run a command. ``Accept: application/x-ndjson`` streams events; closing the
    response kills the command's process group."""
    sb, client = await services.sandboxes.agent(user, sandbox)

    def touch() -> None:
        services.sandboxes.touch(sb.id)

    if NDJSON in request.headers.get("accept", ""):
        # Start the command here, so a failure to start is a proper error status.
        running = _process(client, body)
        proc = await running.__aenter__()

        async def finish() -> None:
            # Politely closed after the exit code; otherwise aborted: SIGKILL.
            await running.__aexit__(None, None, None)

        return LiveStream(
            _stream(proc, body, touch),
            media_type=NDJSON,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            on_close=finish,
        )
    touch()
    result: ExecResult | None = None
    failure: Exception | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            # One helper task: records activity while the command runs, and aborts
            # the request (so the command is killed) when the client goes away.
            guard = tg.create_task(_guard(request, touch))
            try:
                result = await _buffered(client, body)
            except Exception as exc:  # kept out of the group, to reach the error handlers
                failure = exc
            guard.cancel()
    except* ClientGone:
        pass
    if failure is not None:
        raise failure
    if result is None:
        return Response(status_code=499)  # the client is gone; the command was killed
    touch()
    # Unset: encoding and timed_out, sent only when they apply.
    return JSONResponse(result.model_dump(mode="json", exclude_unset=True))


class ClientGone(Exception):
    """The HTTP client disconnected while its request was being served."""


async def _guard(request: Request, touch: Callable[[], None]) -> None:
    """Touch every KEEPALIVE_S; raise ClientGone on ``http.disconnect``."""
    while True:
        try:
            async with asyncio.timeout(KEEPALIVE_S):
                message = await request.receive()
        except TimeoutError:
            touch()
            continue
        if message["type"] == "http.disconnect":
            raise ClientGone


def _process(client: AgentClient, body: ExecBody) -> ExecProcess:
    """The command, with the request's ``stdin`` (if any) fed and then closed."""
    stdin = body.stdin.encode() if body.stdin is not None else b""
    return client.exec_stream(
        body.cmd, env=body.env, cwd=body.cwd, stdin=stdin, user=agent_user(body.user)
    )


async def _buffered(client: AgentClient, body: ExecBody) -> ExecResult:
    stdout, stderr = bytearray(), bytearray()
    exit_code: int | None = None
    timed_out = False
    async with _process(client, body) as proc:
        try:
            async with asyncio.timeout(body.timeout_s):
                async for event in proc:
                    if isinstance(event, Stdout):
                        stdout += event.data
                    elif isinstance(event, Stderr):
                        stderr += event.data
                    else:
                        exit_code = event.code
        except TimeoutError:
            timed_out = True  # leaving the block aborts the connection: SIGKILL
    b64 = body.encoding == "base64"
    only_if_so: dict[str, Any] = {}
    if b64:
        only_if_so["encoding"] = "base64"
    if timed_out:
        only_if_so["timed_out"] = True
    return ExecResult(
        exit_code=TIMEOUT_EXIT if timed_out or exit_code is None else exit_code,
        stdout=_Decoder(b64).text(bytes(stdout), True),
        stderr=_Decoder(b64).text(bytes(stderr), True),
        **only_if_so,
    )


async def _stream(
    proc: ExecProcess, body: ExecBody, touch: Callable[[], None]
) -> AsyncGenerator[bytes, None]:
    b64 = body.encoding == "base64"
    decoders = {"stdout": _Decoder(b64), "stderr": _Decoder(b64)}
    extra = {"encoding": "base64"} if b64 else {}
    async with keep_active(touch):
        try:
            try:
                async with asyncio.timeout(body.timeout_s):
                    async for event in proc:
                        if isinstance(event, Exit):
                            for kind, dec in decoders.items():
                                tail = dec.text(b"", True)
                                if tail:
                                    yield _line({"type": kind, "data": tail})
                            yield _line({"type": "exit", "exit_code": event.code})
                            return
                        kind = "stdout" if isinstance(event, Stdout) else "stderr"
                        text = decoders[kind].text(event.data)
                        if text:
                            yield _line({"type": kind, "data": text, **extra})
            except TimeoutError:
                pass
            yield _line({"type": "exit", "exit_code": TIMEOUT_EXIT, "timed_out": True})
        except AgentError as exc:
            api = to_api_error(exc)
            message = api.message if api is not None else str(exc)
            log.info("exec stream failed: %s", message)
            yield _line({"type": "error", "error": message})
