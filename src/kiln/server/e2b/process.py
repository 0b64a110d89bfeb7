"""envd's ``process.Process`` service on kiln's agent: processes by real guest pid.

Every process E2B starts is a kiln background process (or, with a PTY, a TTY
session started detached), so it outlives the stream that started it, shows
in kiln's own ``GET .../processes`` and takes input and signals by pid.

What envd does and this mirrors, as the SDK relies on it:

- Start and Connect stream a ``start`` event with the pid first, then ``data``
  (``stdout``/``stderr``, or ``pty`` for a terminal), then ``end``; while
  nothing happens, ``keepalive`` events (at the client's
  ``Keepalive-Ping-Interval``, at most :data:`KEEPALIVE_MAX_S`).
- The stream's deadline (``connect-timeout-ms``, the SDK's ``timeout``) is the
  process's: it is killed then, whether anyone still reads it or not; a
  client that leaves earlier only detaches.
- Only running processes exist: List shows those; Connect, input and signals
  for one that has exited answer ``not_found`` (so ``kill`` returns False).
- Connect streams output from now on (what was printed before is not replayed).
- A command without a ``cwd`` starts in its user's home; one started without
  ``stdin`` refuses input (``failed_precondition``).

Where kiln differs: a process killed by signal N ends with exit code 128+N
(as kiln reports it everywhere), where envd reports -1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Final

from kiln.agent_client import (
    AgentClient,
    AgentError,
    Exit,
    ProcessFinished,
    ProcessOutput,
    Stderr,
    Stdout,
)
from kiln.protocol import ProcessInfo

from ..streaming import keep_active
from . import messages as m
from .connect import Code, ConnectError, Message, Service
from .envd import EnvdCall

log = logging.getLogger("kiln.server")

service: Service[EnvdCall] = Service("process.Process")

#: Keepalive events are sent at the client's interval, but at least this often:
#: they are also how a stream notices that its client has gone.
KEEPALIVE_MAX_S: Final = 10.0
KEEPALIVE_HEADER: Final = "keepalive-ping-interval"
SIGNALS: Final = {"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9}
_AGENT_SIGNALS: Final = {"SIGNAL_SIGTERM": "TERM", "SIGNAL_SIGKILL": "KILL"}
#: Where a command starts when the SDK names no cwd: as in envd, its user's home.
HOME: Final = "~"


def _event(**event: Message) -> Message:
    return {"event": event}


def _config(info: ProcessInfo) -> Message:
    config: Message = {"cmd": info.cmd[0], "args": list(info.cmd[1:]), "envs": dict(info.env)}
    if info.cwd not in (None, HOME):  # HOME: Start's default, not the caller's choice
        config["cwd"] = info.cwd
    return config


def _not_found(what: str) -> ConnectError:
    return ConnectError(Code.NOT_FOUND, f"process {what} not found")


async def _running(call: EnvdCall, selector: Message | None) -> ProcessInfo:
    """The running process a ProcessSelector names."""
    chosen = m.oneof(selector or {}, ("pid", "tag"))
    if chosen is None:
        raise m.invalid("field 'process' must select a process by 'pid' or 'tag'")
    processes = await call.agent.list_processes()
    if chosen[0] == "pid":
        pid = m.uint32(selector or {}, "pid")
        found = [p for p in processes if p.pid == pid]
        what = str(pid)
    else:
        tag = m.string(selector or {}, "tag")
        found = [p for p in processes if p.tag == tag]
        what = f"with tag {tag!r}"
    running = [p for p in found if p.running]
    if not running:
        raise _not_found(what)
    return running[0]


async def _exists(call: EnvdCall, pid: int, action: Awaitable[None]) -> None:
    """Await ``action`` on a process; one that has just exited is not found, as in
    envd; one that runs on but refused (its stdin is closed) fails its precondition."""
    try:
        await action
    except ProcessFinished as exc:
        with contextlib.suppress(AgentError):
            if (await call.agent.get_process(pid)).running:
                raise ConnectError(Code.FAILED_PRECONDITION, exc.message) from exc
        raise _not_found(str(pid)) from exc


def _keepalive_interval(call: EnvdCall) -> float:
    try:
        asked = float(call.headers.get(KEEPALIVE_HEADER, KEEPALIVE_MAX_S))
    except ValueError:
        asked = KEEPALIVE_MAX_S
    return min(max(asked, 1.0), KEEPALIVE_MAX_S)


class Deadlines:
    """Kills processes whose stream deadline has passed; owns those timers.

    A timer is cancelled when its stream sees the process end; one whose stream
    went away first checks, before it kills, that the pid still names the same
    process (same start time, still running): pids are reused."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def kill_at(self, agent: AgentClient, info: ProcessInfo, delay_s: float) -> asyncio.Task[None]:
        task = asyncio.create_task(self._kill(agent, info, delay_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _kill(agent: AgentClient, info: ProcessInfo, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        with contextlib.suppress(AgentError):  # gone already, or the sandbox with it
            now = await agent.get_process(info.pid)
            if now.running and now.started_at == info.started_at:
                await agent.signal_process(info.pid, "KILL")
                log.info("e2b process %d killed: its timeout passed", info.pid)


deadlines = Deadlines()


def _raise_failure(task: asyncio.Task[None]) -> None:
    """Re-raise what ended the output pump, if it failed."""
    if task.done() and not task.cancelled():
        failure = task.exception()
        if failure is not None:
            raise failure


async def _stream(call: EnvdCall, reader: ProcessOutput, tty: bool) -> AsyncIterator[Message]:
    """The data and end events of ``reader`` (entered), with keepalives between."""
    interval = _keepalive_interval(call)
    queue: asyncio.Queue[Stdout | Stderr | Exit | None] = asyncio.Queue(maxsize=64)

    async def pump() -> None:
        async for event in reader:
            await queue.put(event)
        await queue.put(None)  # ended without an exit (the agent went away)

    task = asyncio.create_task(pump())
    try:
        async with keep_active(call.touch):
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    _raise_failure(task)
                    yield _event(keepalive={})
                    continue
                if event is None:
                    _raise_failure(task)
                    raise ConnectError(Code.UNAVAILABLE, "the process's output ended early")
                if isinstance(event, Exit):
                    end: Message = {"exited": True, "status": f"exit status {event.code}"}
                    if event.code != 0:
                        end["exitCode"] = event.code
                        end["error"] = f"exit status {event.code}"
                    yield _event(end=end)
                    return
                kind = "pty" if tty else ("stdout" if isinstance(event, Stdout) else "stderr")
                yield _event(data={kind: m.b64(event.data)})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, AgentError):
            await task


@service.server_stream("Start")
async def start(call: EnvdCall, request: Message) -> AsyncIterator[Message]:
    config = m.message(request, "process") or {}
    cmd = m.string(config, "cmd")
    if not cmd:
        raise m.invalid("field 'process.cmd' is required")
    argv = [cmd, *m.strings(config, "args")]
    pty = m.message(request, "pty")
    size = m.message(pty, "size") if pty is not None else None
    rows = m.uint32(size, "rows") if size is not None else None
    cols = m.uint32(size, "cols") if size is not None else None
    stdin = m.boolean(request, "stdin")
    info = await call.agent.start_process(
        argv,
        env=m.str_map(config, "envs"),
        cwd=m.string(config, "cwd") or HOME,
        user=call.user,
        stdin=True if stdin is None else stdin,
        tag=m.string(request, "tag"),
        tty=pty is not None,
        rows=rows or None,
        cols=cols or None,
    )
    call.touch()
    timer = None
    if call.deadline_s is not None:
        timer = deadlines.kill_at(call.agent, info, call.deadline_s)
    yield _event(start={"pid": info.pid})
    # All it printed so far (it has only just started) and then live output.
    async with call.agent.process_output(info.pid, replay=True) as reader:
        async for event in _stream(call, reader, info.tty):
            if timer is not None and "end" in event["event"]:
                timer.cancel()  # it ended in time
            yield event


@service.server_stream("Connect")
async def connect(call: EnvdCall, request: Message) -> AsyncIterator[Message]:
    info = await _running(call, m.message(request, "process"))
    async with call.agent.process_output(info.pid, replay=False) as reader:
        yield _event(start={"pid": info.pid})
        async for event in _stream(call, reader, info.tty):
            yield event


@service.unary("List")
async def list_(call: EnvdCall, request: Message) -> Message:
    processes = []
    for info in await call.agent.list_processes():
        if not info.running:
            continue
        entry: Message = {"pid": info.pid, "config": _config(info)}
        if info.tag is not None:
            entry["tag"] = info.tag
        processes.append(entry)
    return {"processes": processes}


def _input(request: Message) -> bytes:
    data = m.message(request, "input") or {}
    chosen = m.oneof(data, ("stdin", "pty"))
    if chosen is None:
        return b""
    return m.data(data, chosen[0]) or b""


@service.unary("SendInput")
async def send_input(call: EnvdCall, request: Message) -> Message:
    info = await _running(call, m.message(request, "process"))
    data = _input(request)
    await _exists(call, info.pid, call.agent.process_input(info.pid, data))
    call.touch()
    return {}


@service.client_stream("StreamInput")
async def stream_input(call: EnvdCall, requests: AsyncIterator[Message]) -> Message:
    pid: int | None = None
    async for request in requests:
        chosen = m.oneof(request, ("start", "data", "keepalive"))
        if chosen is None or chosen[0] == "keepalive":
            continue
        if chosen[0] == "start":
            info = await _running(call, m.message(m.message(request, "start") or {}, "process"))
            pid = info.pid
            continue
        if pid is None:
            raise m.invalid("the first message of StreamInput must be 'start'")
        data = _input(m.message(request, "data") or {})
        await _exists(call, pid, call.agent.process_input(pid, data))
        call.touch()
    return {}


@service.unary("SendSignal")
async def send_signal(call: EnvdCall, request: Message) -> Message:
    signal = m.enum(request, "signal", SIGNALS)
    if signal not in _AGENT_SIGNALS:
        raise m.invalid("field 'signal' must be SIGNAL_SIGTERM or SIGNAL_SIGKILL")
    info = await _running(call, m.message(request, "process"))
    await _exists(call, info.pid, call.agent.signal_process(info.pid, _AGENT_SIGNALS[signal]))
    return {}


@service.unary("CloseStdin")
async def close_stdin(call: EnvdCall, request: Message) -> Message:
    info = await _running(call, m.message(request, "process"))
    if info.tty:
        raise ConnectError(
            Code.FAILED_PRECONDITION, "a terminal has no stdin to close: send Ctrl-D (0x04)"
        )
    await _exists(call, info.pid, call.agent.process_input(info.pid, b"", close=True))
    return {}


@service.unary("Update")
async def update(call: EnvdCall, request: Message) -> Message:
    info = await _running(call, m.message(request, "process"))
    pty = m.message(request, "pty")
    size = m.message(pty, "size") if pty is not None else None
    if size is None:
        return {}  # nothing to change
    rows, cols = m.uint32(size, "rows"), m.uint32(size, "cols")
    if not rows or not cols:
        raise m.invalid("field 'pty.size' needs rows and cols above 0")
    await _exists(call, info.pid, call.agent.resize_process(info.pid, rows, cols))
    return {}
