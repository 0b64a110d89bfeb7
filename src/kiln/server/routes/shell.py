"""``GET /sandboxes/{id}/ws``: an interactive terminal over a WebSocket.

Binary messages both ways are terminal bytes; a text message
``{"type":"resize","rows":R,"cols":C}`` resizes. Closing the socket detaches
(the session keeps running). The session id is sent in the upgrade response's
``X-Kiln-Session-Id`` header; when the process exits the socket is closed with
code 1000 and the reason ``exit <code>``. ``?user=root`` starts the new session
as root instead of the sandbox user.

A request that cannot become a terminal (no or wrong key, unknown sandbox or
session, bad parameters) is refused before the upgrade with the usual JSON
error and status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from kiln.agent_client import AgentError, TtySession
from kiln.api.requests import agent_user, exec_user_error

from ..auth import authenticate, bearer_token
from ..errors import ApiError, BadRequest, to_api_error
from ..services import Services
from ..streaming import keep_active

router = APIRouter(tags=["shell"])
log = logging.getLogger("kiln.server")

SESSION_HEADER = "X-Kiln-Session-Id"
#: How long to wait for a new session's id before upgrading without the header.
SESSION_INFO_WAIT_S = 5.0
_SHELL_META = set("|&;<>()$`\\\"'*?[]#~=%{}\n")


def _dimension(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or not 1 <= int(value) <= 0xFFFF:
        raise BadRequest(f"{name} must be an integer within 1..65535, got {value!r}")
    return int(value)


def _user(value: str | None, *, reattach: bool) -> str | None:
    """``?user=``: the ExecRequest user for a new session (checked before any upgrade)."""
    if value is None or value == "":
        return None
    error = exec_user_error(value)
    if error is not None:
        raise BadRequest(f"user: {error}")
    if reattach:
        # The session keeps the user it was started as; saying otherwise would mislead.
        raise BadRequest("user applies to a new session, not to a reattach (session_id)")
    return agent_user(value)


def command_argv(cmd: str | None) -> list[str] | None:
    """``?cmd=``: simple words run directly, anything with shell syntax via ``sh -c``."""
    if cmd is None or not cmd.strip():
        return None
    if _SHELL_META & set(cmd):
        return ["/bin/sh", "-c", cmd]
    return shlex.split(cmd)


async def _deny(ws: WebSocket, error: ApiError) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(
            JSONResponse({"error": error.message}, status_code=error.status)
        )
    else:
        await ws.close(code=4000 + error.status, reason=error.message[:120])


@router.websocket("/sandboxes/{sandbox}/ws")
async def shell(ws: WebSocket, sandbox: str) -> None:
    services: Services = ws.app.state.services
    params = ws.query_params
    try:
        user = authenticate(services, params.get("token") or bearer_token(ws.headers))
        rows = _dimension(params.get("rows"), "rows")
        cols = _dimension(params.get("cols"), "cols")
        session_id = params.get("session_id") or None
        argv = command_argv(params.get("cmd"))
        if session_id is not None and argv is not None:
            raise BadRequest("give either cmd (a new session) or session_id (reattach)")
        as_user = _user(params.get("user"), reattach=session_id is not None)
        sb, client = await services.sandboxes.agent(user, sandbox)
        tty = client.attach(argv, session_id=session_id, rows=rows, cols=cols, user=as_user)
        await tty.__aenter__()
    except Exception as exc:
        api = to_api_error(exc)
        if api is None:
            raise
        await _deny(ws, api)
        return

    try:
        async with keep_active(lambda: services.sandboxes.touch(sb.id)):
            await _relay(ws, tty, rows, cols, reattach=session_id is not None)
    finally:
        # Detach (never kill): the session lives on for a later reattach.
        await tty.__aexit__(None, None, None)


async def _relay(
    ws: WebSocket, tty: TtySession, rows: int | None, cols: int | None, *, reattach: bool
) -> None:
    output: asyncio.Queue[bytes | None] = asyncio.Queue()
    failure: list[BaseException] = []

    async def pump_out() -> None:
        try:
            async for chunk in tty:
                output.put_nowait(chunk)
        except AgentError as exc:
            failure.append(exc)
        finally:
            output.put_nowait(None)

    reader = asyncio.create_task(pump_out())
    try:
        if tty.session_id is None:
            # A new session: the agent names it first thing; wait briefly for that.
            async with asyncio.timeout(SESSION_INFO_WAIT_S):
                while tty.session_id is None and not reader.done() and output.empty():  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
        headers = []
        if tty.session_id is not None:
            headers.append((SESSION_HEADER.lower().encode(), tty.session_id.encode()))
        await ws.accept(headers=headers)
        if reattach and rows is not None and cols is not None:
            await tty.resize(rows, cols)
        writer = asyncio.create_task(_pump_in(ws, tty))
        try:
            while True:
                getter = asyncio.create_task(output.get())
                await asyncio.wait({getter, writer}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break  # the client left (or sent garbage): detach
                chunk = getter.result()
                if chunk is None:
                    await _close_after_exit(ws, tty, failure)
                    break
                await ws.send_bytes(chunk)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    except (WebSocketDisconnect, OSError, TimeoutError):
        pass
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _close_after_exit(ws: WebSocket, tty: TtySession, failure: list[BaseException]) -> None:
    if ws.application_state is not WebSocketState.CONNECTED:
        return
    if failure:
        await ws.close(code=1011, reason=str(failure[0])[:120])
    elif tty.exit_code is not None:
        await ws.close(code=1000, reason=f"exit {tty.exit_code}")
    else:
        await ws.close(code=1000)


async def _pump_in(ws: WebSocket, tty: TtySession) -> None:
    """Client → session until the client closes (returns) or the session goes away."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data: bytes | None = message.get("bytes")
        if data is not None:
            if data:
                await tty.write(data)
            continue
        text: str | None = message.get("text")
        if text is None:
            continue
        control = _control(text)
        if control is None:
            # Not a control message: some terminals send keystrokes as text frames.
            await tty.write(text.encode())
            continue
        resize = _resize(control)
        if resize is not None:
            await tty.resize(*resize)


def _control(text: str) -> dict[str, Any] | None:
    """A JSON object with a string ``type``, or None (then it is terminal input)."""
    if not text.startswith("{"):
        return None
    try:
        msg: Any = json.loads(text)
    except ValueError:
        return None
    if isinstance(msg, dict) and isinstance(msg.get("type"), str):
        return msg
    return None


def _resize(msg: dict[str, Any]) -> tuple[int, int] | None:
    if msg.get("type") != "resize":
        return None
    rows, cols = msg.get("rows"), msg.get("cols")
    if (
        isinstance(rows, int)
        and isinstance(cols, int)
        and not isinstance(rows, bool)
        and not isinstance(cols, bool)
        and 0 < rows <= 0xFFFF
        and 0 < cols <= 0xFFFF
    ):
        return rows, cols
    return None
