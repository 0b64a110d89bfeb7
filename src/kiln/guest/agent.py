"""The agent: listeners, authentication, and dispatch of connections.

Two listeners (TCP 1024/1025 in a VM, ``control.sock``/``forward.sock`` in test
mode). Every connection gets its own task, tracked so that shutdown can cancel
and await it. A connection's failure is answered with ERROR (when the socket
still works) and closes that connection only: nothing a peer sends can stop the
agent or disturb its other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln.protocol import (
    INIT_SESSION_ID,
    ActivityInfo,
    ClockSet,
    ExecKillRequest,
    ExecRequest,
    FileReadRequest,
    FileWriteRequest,
    Frame,
    FrameStream,
    FrameType,
    MkdirRequest,
    MoveRequest,
    PathRequest,
    ProcessAttach,
    ProcessInput,
    ProcessResize,
    ProcessSignal,
    ProcessStart,
    ProtocolError,
    RemoveRequest,
    StatusResponse,
    WatchRequest,
    decode_json,
    encode_exit,
    session_list_to_payload,
)

from . import files, fsops, watch
from .config import GuestConfig
from .context import GuestContext, Settings, UserInfo, recv_frame
from .errors import ConfigError, RequestError
from .execution import run_piped
from .forward import serve_forward
from .ports import CONTROL_PORT, FORWARD_PORT
from .prepared import Prepared
from .process import Children
from .processes import ProcessTable
from .sessions import SessionRegistry

log = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"
FORWARD_SOCKET = "forward.sock"
#: StreamReader buffer: frames up to 1 MiB arrive in few reads.
STREAM_LIMIT = 1 << 20
#: After an ERROR, read and drop what the peer still sends for this long before
#: closing, so the ERROR is not lost to a connection reset.
ERROR_LINGER = 0.5
UNIX_BACKLOG = 128

REQUEST_TYPES = frozenset(
    {
        FrameType.EXEC_REQ,
        FrameType.EXEC_LIST_REQ,
        FrameType.EXEC_KILL,
        FrameType.ACTIVITY_REQ,
        FrameType.FILE_READ_REQ,
        FrameType.FILE_WRITE_REQ,
        FrameType.FILE_STAT_REQ,
        FrameType.FILE_LS_REQ,
        FrameType.FILE_MKDIR_REQ,
        FrameType.FILE_MOVE_REQ,
        FrameType.FILE_REMOVE_REQ,
        FrameType.FILE_WATCH_REQ,
        FrameType.CLOCK_SET,
        FrameType.CONFIGURE,
        FrameType.PROC_START,
        FrameType.PROC_LIST_REQ,
        FrameType.PROC_ATTACH,
        FrameType.PROC_INPUT,
        FrameType.PROC_SIGNAL,
        FrameType.PROC_RESIZE,
    }
)

#: Requests after which the host may still be sending (stdin, or nothing but a
#: close to end a reader): the connection lingers instead of closing at once.
_STREAMING_REQUESTS = frozenset(
    {FrameType.EXEC_REQ, FrameType.PROC_ATTACH, FrameType.FILE_WATCH_REQ}
)

#: Sets the wall clock (ns since the epoch) and mixes an optional seed into the
#: kernel RNG. None in test mode: CLOCK_SET is acknowledged, nothing changes.
ClockSetter = Callable[[int, bytes | None], None]
#: The machine's part of CONFIGURE (clock and RNG, hostname, files owned by the
#: user); None in test mode, where only the agent's own settings change. It applies
#: what the answer waits for (raising OSError) and may return the rest, to run once
#: the answer is out; every later request waits for that (see Agent._configure).
Reconfigurer = Callable[[GuestConfig, UserInfo], Callable[[], None] | None]


@dataclass(frozen=True, slots=True)
class Listen:
    """Where the agent listens: Unix sockets in ``socket_dir``, else TCP: ``sockets``
    (control, forward) already listening, else ``host`` and the ports."""

    socket_dir: Path | None = None
    host: str = "0.0.0.0"
    control_port: int = CONTROL_PORT
    forward_port: int = FORWARD_PORT
    sockets: tuple[socket.socket, ...] = ()


class Agent:
    def __init__(
        self,
        settings: Settings,
        listen: Listen,
        *,
        init_script: str | None = None,
        reap_orphans: bool = False,
        clock: ClockSetter | None = None,
        prepared: Prepared | None = None,
        reconfigure: Reconfigurer | None = None,
    ) -> None:
        self.settings = settings
        self._reconfigure = reconfigure
        self._prepared = prepared or Prepared()
        self._listen = listen
        self._init_script = init_script
        self._reap_orphans = reap_orphans
        self._clock = clock
        self._connections: set[asyncio.Task[object]] = set()
        self._stopping = asyncio.Event()
        # Created in run(), inside the event loop.
        self._ctx: GuestContext | None = None
        self._sessions: SessionRegistry | None = None
        self._processes: ProcessTable | None = None
        #: What the last CONFIGURE does after its answer; requests wait for it.
        self._configuring: asyncio.Task[None] | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then clean up."""
        loop = asyncio.get_running_loop()
        children = Children()
        ctx = self._ctx = GuestContext(self.settings, children)
        processes = self._processes = ProcessTable(ctx)
        sessions = self._sessions = SessionRegistry(ctx, processes)
        if self._reap_orphans:
            children.start_reaping_orphans()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        if self._prepared.executor is not None:
            loop.set_default_executor(self._prepared.executor)
        ctx.prepare_spawner(self.settings.user, self._prepared.spawner)
        if self._init_script:
            await self._start_init(self._init_script)
        servers = await self._listen_all()
        if self.settings.test_mode:
            log.info("agent ready (test mode)")
        else:
            log.info("agent ready (vm) at %.2f s after kernel start", time.monotonic())
        try:
            await self._stopping.wait()
        finally:
            log.info("agent stopping")
            for server in servers:
                server.close()
            for task in self._connections:
                task.cancel()
            if self._connections:
                await asyncio.wait(self._connections)
            if self._configuring is not None:
                await asyncio.wait([self._configuring])
            await sessions.aclose()
            await processes.aclose()
            if ctx.spawners is not None:
                ctx.spawners.close()
            await ctx.syncer.aclose()
            children.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self._listen.socket_dir is not None:
                for name in (CONTROL_SOCKET, FORWARD_SOCKET):
                    with contextlib.suppress(FileNotFoundError):
                        (self._listen.socket_dir / name).unlink()

    async def _start_init(self, script: str) -> None:
        assert self._sessions is not None
        req = ExecRequest(cmd=("/bin/sh", "-c", script), tty=True)
        try:
            await self._sessions.start(req, session_id=INIT_SESSION_ID)
        except Exception:
            log.exception("cannot start the init session")

    async def _listen_all(self) -> list[asyncio.Server]:
        listen = self._listen
        handlers = (self._serve_control, self._serve_forward)
        if listen.socket_dir is not None:
            servers = []
            for name, handler in zip((CONTROL_SOCKET, FORWARD_SOCKET), handlers, strict=True):
                sock = _listening_unix_socket(listen.socket_dir / name)
                servers.append(
                    await asyncio.start_unix_server(
                        self._tracked(handler), sock=sock, limit=STREAM_LIMIT
                    )
                )
            return servers
        if listen.sockets:
            return [
                await asyncio.start_server(self._tracked(handler), sock=sock, limit=STREAM_LIMIT)
                for sock, handler in zip(listen.sockets, handlers, strict=True)
            ]
        return [
            await asyncio.start_server(
                self._tracked(handler), listen.host, port, limit=STREAM_LIMIT, reuse_address=True
            )
            for port, handler in zip(
                (listen.control_port, listen.forward_port), handlers, strict=True
            )
        ]

    def _tracked(
        self, handler: Callable[[FrameStream], Awaitable[bool]]
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            conn = FrameStream(reader, writer)
            try:
                at_once = await self._guarded(conn, handler)
                if self.settings.host_closes_first:
                    await _await_host_close(conn)
                elif not at_once:
                    await _linger(conn)
            finally:
                self._connections.discard(task)
                await conn.close()

        return on_connection

    async def _guarded(
        self, conn: FrameStream, handler: Callable[[FrameStream], Awaitable[bool]]
    ) -> bool:
        """Run a connection handler; turn every failure into ERROR + close.

        True when the connection may close at once (see :func:`_linger`)."""
        try:
            if await self._authenticate(conn):
                return await handler(conn)
        except (RequestError, ProtocolError) as exc:
            await self._refuse(conn, str(exc))
        except ConnectionError:
            pass  # the host went away
        except Exception as exc:
            log.exception("connection handler failed")
            await self._refuse(conn, f"internal error: {exc!r}")
        return False

    async def _authenticate(self, conn: FrameStream) -> bool:
        token = self.settings.token
        if token is None:
            return True  # an AUTH frame, if any, is skipped with the request's preamble
        try:
            # asyncio.timeout, not wait_for: no extra task on every connection.
            async with asyncio.timeout(self.settings.auth_timeout):
                frame = await conn.recv()
        except TimeoutError:
            await self._refuse(conn, "authentication timed out")
            return False
        if frame is None:
            return False
        if frame.type != FrameType.AUTH:
            await self._refuse(conn, "authentication required")
            return False
        if not hmac.compare_digest(frame.payload, token.encode()):
            await self._refuse(conn, "authentication failed")
            return False
        return True

    async def _refuse(self, conn: FrameStream, message: str) -> None:
        """Best effort ERROR; the connection's wrapper then lingers and closes."""
        if conn.writer.is_closing():
            return
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(conn.send_error(message), ERROR_LINGER)

    # ---- control connection ------------------------------------------------------

    async def _serve_control(self, conn: FrameStream) -> bool:
        """One request. True when it was answered in full and the host has sent all
        it will: every request but an exec (whose stdin may still be on its way),
        unless more bytes than the request came."""
        frame = await self._read_request(conn)
        if frame is None:
            return False
        if self._configuring is not None:
            await asyncio.shield(self._configuring)  # never raises: see _after_configure
        await self._dispatch(conn, frame)
        return frame.type not in _STREAMING_REQUESTS and not conn.buffered

    @staticmethod
    async def _read_request(conn: FrameStream) -> Frame | None:
        frame = await recv_frame(conn)
        if frame is not None and frame.type not in REQUEST_TYPES:
            raise RequestError(f"expected a request, got {FrameType(frame.type).name}")
        return frame

    async def _dispatch(self, conn: FrameStream, frame: Frame) -> None:
        ctx, sessions, processes = self._ctx, self._sessions, self._processes
        assert ctx is not None and sessions is not None and processes is not None
        ftype, payload = frame.type, frame.payload
        if ftype == FrameType.EXEC_REQ:
            req = ExecRequest.from_payload(payload)
            if req.tty:
                await sessions.serve(conn, req)
            else:
                await run_piped(conn, req, ctx)
        elif ftype == FrameType.EXEC_LIST_REQ:
            await conn.send(FrameType.EXEC_LIST_RESP, session_list_to_payload(sessions.list()))
        elif ftype == FrameType.EXEC_KILL:
            await sessions.kill(ExecKillRequest.from_payload(payload).session_id)
            await conn.send(FrameType.EXIT, encode_exit(0))
        elif ftype == FrameType.ACTIVITY_REQ:
            await conn.send(FrameType.ACTIVITY_RESP, self._activity().to_payload())
        elif ftype == FrameType.FILE_READ_REQ:
            await files.read_file(conn, FileReadRequest.from_payload(payload), ctx)
        elif ftype == FrameType.FILE_WRITE_REQ:
            await files.write_file(conn, FileWriteRequest.from_payload(payload), ctx)
        elif ftype == FrameType.FILE_STAT_REQ:
            req_stat = PathRequest.from_payload(payload)
            if req_stat.user is None:
                info = files.stat_path(req_stat, ctx)
            else:  # switching identity happens in a worker thread
                info = await asyncio.to_thread(files.stat_path, req_stat, ctx)
            ctx.touch()
            await conn.send(FrameType.FILE_STAT_RESP, info.to_payload())
        elif ftype == FrameType.FILE_LS_REQ:
            req_ls = PathRequest.from_payload(payload)
            listing = await asyncio.to_thread(files.list_dir, req_ls, ctx)
            ctx.touch()
            await conn.send(FrameType.FILE_LS_RESP, listing)
        elif ftype == FrameType.FILE_MKDIR_REQ:
            made = await fsops.make_dir(MkdirRequest.from_payload(payload), ctx)
            ctx.touch()
            await conn.send(FrameType.FILE_MKDIR_RESP, made.to_payload())
        elif ftype == FrameType.FILE_MOVE_REQ:
            moved = await fsops.move(MoveRequest.from_payload(payload), ctx)
            ctx.touch()
            await conn.send(FrameType.FILE_MOVE_RESP, moved.to_payload())
        elif ftype == FrameType.FILE_REMOVE_REQ:
            await fsops.remove(RemoveRequest.from_payload(payload), ctx)
            ctx.touch()
            await conn.send(FrameType.FILE_REMOVE_RESP, StatusResponse("ok").to_payload())
        elif ftype == FrameType.FILE_WATCH_REQ:
            await watch.watch_dir(conn, WatchRequest.from_payload(payload), ctx)
        elif ftype == FrameType.CLOCK_SET:
            await conn.send(FrameType.CLOCK_SET_RESP, self._set_clock(payload).to_payload())
        elif ftype == FrameType.CONFIGURE:
            answer, after = await self._configure(payload)
            try:
                await conn.send(FrameType.CONFIGURE_RESP, answer.to_payload())
            finally:  # (what was applied is completed, answered or not)
                if after is not None:
                    self._configuring = asyncio.create_task(after(), name="configure")
        elif ftype == FrameType.PROC_START:
            start = ProcessStart.from_payload(payload)
            if start.tty:
                await sessions.start_detached(conn, start)
            else:
                await processes.start(conn, start)
        elif ftype == FrameType.PROC_LIST_REQ:
            await processes.send_list(conn)
        elif ftype == FrameType.PROC_ATTACH:
            await processes.attach(conn, ProcessAttach.from_payload(payload))
        elif ftype == FrameType.PROC_INPUT:
            await processes.write_input(conn, ProcessInput.from_payload(payload))
        elif ftype == FrameType.PROC_SIGNAL:
            await processes.send_signal(conn, ProcessSignal.from_payload(payload))
        elif ftype == FrameType.PROC_RESIZE:
            await processes.resize(conn, ProcessResize.from_payload(payload))
        else:  # pragma: no cover - REQUEST_TYPES and this chain list the same types
            raise RequestError(f"unsupported request {FrameType(ftype).name}")

    def _activity(self) -> ActivityInfo:
        """Piped execs in flight count as attached and running: a host is connected to
        each one and it keeps the sandbox busy."""
        assert self._ctx is not None and self._sessions is not None
        assert self._processes is not None
        attached, running = self._sessions.counts()
        # Output readers count as attached: someone is watching.
        # So do directory watches: someone waits for the sandbox's changes.
        in_flight = len(self._ctx.running_execs) + self._processes.readers + self._ctx.watches
        return ActivityInfo(
            last_activity_unix=self._ctx.last_activity,
            attached_sessions=attached + in_flight,
            running_sessions=running + in_flight + self._processes.running_background(),
        )

    def _set_clock(self, payload: bytes) -> StatusResponse:
        """CLOCK_SET ``{"unix_ns": int, "seed"?: hex}``: the optional seed (host
        randomness, ≤ 4096 bytes) is mixed into the kernel RNG, so that clones
        restored from one snapshot stop sharing RNG state."""
        req = ClockSet.from_payload(payload)
        if self._clock is None:
            return StatusResponse("ok")  # test mode: never touch the host's clock
        try:
            self._clock(req.unix_ns, req.seed)
        except OSError as exc:
            return StatusResponse("error", f"cannot set the clock: {exc.strerror or exc}")
        return StatusResponse("ok")

    async def _configure(
        self, payload: bytes
    ) -> tuple[StatusResponse, Callable[[], Coroutine[Any, Any, None]] | None]:
        """CONFIGURE: a config.json (see :mod:`.config`) applied to a running agent.

        How a sandbox from the host's warm pool becomes someone's: the pool made it
        with nothing user-specific, and this brings its clock, RNG seed, hostname,
        files, env and token -- each only if present (``env`` replaces the sandbox
        env when its key is there) -- and starts ``init``. The answer goes out on
        this connection, authenticated by the old token; later ones need the new.

        Returned beside the answer: what follows it (files written, ``init`` started,
        the writes flushed), which every later request waits for -- the host's next
        request is on its way meanwhile.
        """
        ctx = self._ctx
        assert ctx is not None
        try:
            data = decode_json(payload)
            config = GuestConfig.from_json(data)
        except (ProtocolError, ConfigError) as exc:
            return StatusResponse("error", f"bad configuration: {exc}"), None
        rest = None
        if self._reconfigure is not None:
            try:
                rest = self._reconfigure(config, self.settings.user)
            except OSError as exc:
                return StatusResponse("error", f"cannot apply the configuration: {exc}"), None
        settings = self.settings
        if config.token is not None:
            settings = replace(settings, token=config.token)
        if "env" in data:
            settings = replace(settings, sandbox_env=dict(config.env))
        self.settings = ctx.settings = settings
        ctx.touch()
        # Flushed soon rather than by the sync before the first exec's exit code.
        flush = bool(config.files or config.hostname) and settings.durable
        if rest is None and not config.init and not flush:
            return StatusResponse("ok"), None
        return StatusResponse("ok"), functools.partial(
            self._after_configure, rest, config.init, flush=flush
        )

    async def _after_configure(
        self, rest: Callable[[], None] | None, init: str | None, *, flush: bool
    ) -> None:
        """CONFIGURE's part after its answer; never raises (requests wait for it)."""
        ctx = self._ctx
        assert ctx is not None
        try:
            if rest is not None:
                rest()
            if init:
                await self._start_init(init)
            if flush:
                ctx.syncer.start()
        except Exception:
            log.exception("configure: applying the configuration failed")

    # ---- forward connection ------------------------------------------------------

    async def _serve_forward(self, conn: FrameStream) -> bool:
        assert self._ctx is not None
        await serve_forward(conn, self._ctx)
        return False


def _listening_unix_socket(path: Path) -> socket.socket:
    """A Unix socket that appears at ``path`` only once it accepts connections.

    It is bound under a temporary name and renamed after listen(): whoever waits
    for the file to exist (tests, the host) can connect at once, never getting
    ECONNREFUSED in the gap between bind() and listen().
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temp))
        sock.listen(UNIX_BACKLOG)
        os.replace(temp, path)  # also replaces a stale socket of an earlier run
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return sock


async def _await_host_close(conn: FrameStream) -> None:
    """Read (and drop) what the host still sends until it closes, bounded: the host
    closes as soon as it has the final frame, so its FIN comes before ours."""
    writer = conn.writer
    if writer.is_closing():
        return
    try:
        async with asyncio.timeout(ERROR_LINGER):
            await writer.drain()
            while await conn.reader.read(1 << 16):
                pass
    except (TimeoutError, OSError):
        pass


async def _linger(conn: FrameStream) -> None:
    """Half-close, then read what the host still sends until it closes (bounded).

    Closing a TCP socket with unread input makes Linux send a reset, and a reset
    can destroy the EXIT or ERROR frame still travelling to the host. The host
    closes as soon as it has the final frame, so this normally ends at once.

    Only where input may still come: an exec (stdin), a forward, an ERROR (the
    host may be sending anything). After any other request the host has sent all
    it will, and waiting here for its FIN cost 4-6 ms of the single vCPU's time
    under TCG, in the way of the host's next request.
    """
    writer = conn.writer
    if writer.is_closing():
        return
    try:
        async with asyncio.timeout(ERROR_LINGER):
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(ERROR_LINGER):
            while await conn.reader.read(1 << 16):
                pass
    except (TimeoutError, OSError):
        pass
