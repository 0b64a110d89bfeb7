# unasync: async-only
"""The asyncio client: :class:`AsyncKiln` and the objects it hands out.

This file is the source of both clients: ``scripts/gen_sync_sdk`` generates the
synchronous one (``_sync.py``, :class:`~kiln.sdk.Kiln`) from it; see that script
for the rules and the ``# unasync:`` markers. Both clients execute the same
:class:`~kiln.sdk._api.Call` descriptions, so requests and parsing are defined once.
"""
# unasync: sync-only
# """The synchronous client: :class:`Kiln` and the objects it hands out.
#
# Generated from ``_async.py``, the asyncio client, which has the same API awaited.
# """
# unasync: end

from __future__ import annotations

import asyncio
import builtins
import copy
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self, TypeVar

import httpx
from pydantic import PrivateAttr

from . import _api, models
from ._api import Call, map_exceptions, raise_for_status
from .config import load_settings
from .errors import InvalidResponse, KilnError, NotFound, Timeout
from .models import (
    ExecEvent,
    ExecResult,
    Exit,
    FileContent,
    FileStat,
    Health,
    ImageInfo,
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
    Template,
    Volume,
    VolumeMount,
    parse_exec_event,
)

if TYPE_CHECKING:
    from kiln.protocol.fsops import FileEvent
    from kiln.protocol.messages import FileInfo, FileListing

    from .shell import AsyncShellSession

T = TypeVar("T")


class AsyncKiln:
    """A client for one kiln daemon.

    ``url`` and ``token`` fall back to ``KILN_URL``/``KILN_TOKEN``, then to
    ``~/.kiln/config.yaml``, then to ``http://127.0.0.1:8080``. No network
    I/O happens until the first call. ``retries`` is how many times a request
    that never reached the daemon, or an idempotent one answered 502/503/504,
    is sent again (with backoff). Use it as a context manager (``async with``),
    or call :meth:`close`, to release its connections::

        async with AsyncKiln() as k:
            sb = await k.sandboxes.create(name="demo")
            result = await sb.exec(["echo", "hi"])
            print(result.stdout)
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = _api.DEFAULT_RETRIES,
    ) -> None:
        settings = load_settings(url, token)
        self.url: str = settings.url
        self._token = settings.token
        self._http = httpx.AsyncClient(
            base_url=settings.url,
            headers=_api.auth_headers(settings.token),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self._retries = retries
        #: A read timeout that overrides every call's own (see :meth:`with_options`).
        self._timeout: float | None = _api.DEFAULT
        self._owns_http = True
        self._attach()

    def _attach(self) -> None:
        #: Create, find, change and delete sandboxes.
        self.sandboxes = AsyncSandboxes(self)
        #: Secrets (values join a sandbox's environment by name).
        self.secrets = AsyncSecrets(self)
        #: Persistent volumes.
        self.volumes = AsyncVolumes(self)
        #: Sandbox templates.
        self.templates = AsyncTemplates(self)
        #: Sandboxes saved as images (``sandbox.save_image(name)``).
        self.saved_images = AsyncSavedImages(self)
        #: Images: built-in tiers, global ones and your own package-list builds.
        self.images = AsyncImages(self)
        #: The cluster's nodes (admins; none on a single daemon).
        self.nodes = AsyncNodes(self)

    def __repr__(self) -> str:
        return f"AsyncKiln(url={self.url!r})"

    # -- plumbing ---------------------------------------------------------------------

    async def _call(self, call: Call[T], content: Any = None) -> T:
        """Send ``call`` and parse its answer; every httpx error becomes a KilnError.

        A request that never reached the daemon (connection refused) is sent again,
        and so is an idempotent one answered 502/503/504, up to ``retries`` times
        with backoff: a daemon restarting is a pause, not an error.
        """
        timeout = call.timeout if self._timeout is _api.DEFAULT else self._timeout
        attempt = 0
        while True:
            try:
                with map_exceptions(self.url):
                    resp = await self._http.request(
                        call.method,
                        call.path,
                        params=call.params,
                        json=call.json,
                        content=content,
                        headers=call.headers,
                        timeout=httpx.USE_CLIENT_DEFAULT if timeout is _api.DEFAULT else timeout,
                    )
            except KilnError as exc:
                if attempt >= self._retries or not _api.retry_failure(call.method, exc):
                    raise
                await asyncio.sleep(_api.backoff_s(attempt))
                attempt += 1
                continue
            if attempt < self._retries and _api.retry_status(call.method, resp.status_code):
                await resp.aclose()
                await asyncio.sleep(_api.backoff_s(attempt, resp))
                attempt += 1
                continue
            return call.parse(resp)

    async def _send_streaming(self, call: Call[Any]) -> httpx.Response:
        """Send ``call`` for a streamed answer (NDJSON); an error status is raised here,
        with the body read for its message."""
        http = self._http
        with map_exceptions(self.url):
            request = http.build_request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                headers=call.headers,
                timeout=call.timeout,
            )
            resp = await http.send(request, stream=True)
            if resp.status_code >= 400:
                await resp.aread()
                await resp.aclose()
        raise_for_status(resp)
        return resp

    def with_options(
        self, *, timeout: float | None = _api.DEFAULT, retries: int | None = None
    ) -> Self:
        """The same client (same connections) with another read timeout for every call
        (``None``: wait forever) or another number of retries::

            k.with_options(timeout=5).sandboxes.list()

        Closing the original closes the connections; closing this one does nothing.
        """
        view = copy.copy(self)
        if timeout is not _api.DEFAULT:
            view._timeout = timeout
        if retries is not None:
            if retries < 0:
                raise ValueError("retries must be >= 0")
            view._retries = retries
        view._owns_http = False
        view._attach()
        return view

    # -- top level --------------------------------------------------------------------

    async def health(self) -> Health:
        """``GET /health`` (no key needed): status, sandbox count, uptime, the default
        engine and whether each engine can run here."""
        return await self._call(_api.health())

    async def ports(self) -> list[Port]:
        """Listening ports of all your running sandboxes that are hot or warm (cold
        ones are not woken to be asked), with their sandbox and published URL."""
        return await self._call(_api.all_ports())

    async def close(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        if self._owns_http:
            await self._http.aclose()

    # unasync: sync-only
    # def copy(self) -> Kiln:
    #     """A new client for the same daemon and key, with connections of its own: for
    #     another thread, or after a call cut short by Ctrl+C left this one's pool in an
    #     unknown state (a KeyboardInterrupt can land anywhere, even inside its locks)."""
    #     return Kiln(
    #         self.url, self._token, timeout=self._http.timeout.read or 60.0, retries=self._retries
    #     )
    # unasync: end

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- sandboxes ------------------------------------------------------------------------


class _AsyncSandboxActions:
    """What can be done to a sandbox; shared by :class:`AsyncSandbox` and
    :class:`AsyncSandboxRef`."""

    __slots__ = ()
    _kiln: AsyncKiln

    @property
    def _ref(self) -> str:
        """The id or name that addresses the sandbox in URLs."""
        raise NotImplementedError

    async def refresh(self) -> AsyncSandbox:
        """Fetch the sandbox again (does not wake it)."""
        return await self._kiln.sandboxes.get(self._ref)

    async def update(
        self,
        *,
        name: str | None = None,
        keep_hot: bool | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = _api.UNCHANGED,
        on_expire: str | None = None,
    ) -> AsyncSandbox:
        """Change what is given: rename, pin hot, replace the labels, restart the ttl
        from now (``ttl_s=None``: never expire), change ``on_expire``. Running
        sessions are not disturbed."""
        return await self._kiln.sandboxes.update(
            self._ref,
            name=name,
            keep_hot=keep_hot,
            labels=labels,
            ttl_s=ttl_s,
            on_expire=on_expire,
        )

    async def stop(self) -> AsyncSandbox:
        """Stop it. With ``capabilities.snapshots`` its memory and processes are saved
        to disk and :meth:`start` restores them; without (Docker), its files are kept
        but its processes end, and :meth:`start` boots it again."""
        return await self._kiln.sandboxes.stop(self._ref)

    async def start(self) -> AsyncSandbox:
        """Start it again: restored from its snapshot, or booted again (init not re-run)
        when its engine has no snapshots."""
        return await self._kiln.sandboxes.start(self._ref)

    async def fork(self, name: str | None = None) -> AsyncSandbox:
        """A new sandbox whose disk, memory and running processes are a copy of this
        one's now, with its own address, hostname and token; both go on
        independently. Needs ``capabilities.fork`` and no volumes (409 otherwise)."""
        return await self._kiln.sandboxes.fork(self._ref, name=name)

    async def save_image(self, name: str) -> SavedImage:
        """Save it as an image called ``name``, private to you: its disk and, where its
        engine can (``SavedImage.memory``: QEMU), its memory, so sandboxes created with
        ``sandboxes.create(saved_image=name)`` start with its processes running. It
        goes on running. :class:`Conflict` when the name is taken or it has volumes."""
        return await self._kiln.sandboxes.save(self._ref, name)

    async def delete(self) -> None:
        """Destroy it: frees its IP, disks and published ports."""
        await self._kiln.sandboxes.delete(self._ref)

    async def exec(
        self,
        cmd: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv list, or a string for ``sh -c``) and wait for it.

        Returns the exit code and the whole stdout/stderr decoded as UTF-8. A
        non-zero exit code is not an error. ``timeout_s`` asks the daemon to
        kill the command after that many seconds. ``user="root"`` runs it as
        root instead of the sandbox user (who can also ``sudo``).
        """
        body = _api.exec_body(cmd, env=env, cwd=cwd, timeout_s=timeout_s, user=user)
        return await self._kiln._call(_api.exec_buffered(self._ref, body))

    def exec_stream(
        self,
        cmd: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float | None = None,
        user: str | None = None,
    ) -> AsyncExecStream:
        """Run ``cmd``; iterate with ``async for`` to follow its output as it happens.

        Yields :class:`Stdout` and :class:`Stderr` chunks (raw bytes) and finally
        one :class:`Exit`. ``user`` as for :meth:`exec`. Closing the stream early
        (leaving the ``async with`` block, :meth:`AsyncExecStream.close`) kills
        the command::

            async with sb.exec_stream(["make", "test"]) as events:
                async for event in events:
                    ...
        """
        body = _api.exec_body(
            cmd, env=env, cwd=cwd, timeout_s=timeout_s, encoding="base64", user=user
        )
        return AsyncExecStream(self._kiln, _api.exec_streamed(self._ref, body))

    @property
    def files(self) -> AsyncFiles:
        """Read, write, stat and list files inside the sandbox."""
        return AsyncFiles(self._kiln, self._ref)

    @property
    def processes(self) -> AsyncProcesses:
        """Background commands: start, list, read output, stdin, signals."""
        return AsyncProcesses(self._kiln, self._ref)

    @property
    def sessions(self) -> AsyncSessions:
        """The sandbox's exec and TTY sessions."""
        return AsyncSessions(self._kiln, self._ref)

    async def ports(self) -> list[Port]:
        """TCP ports listening inside the sandbox (wakes it), each with its proxy path
        and, when published, its public URL (``published_url``)."""
        return await self._kiln._call(_api.sandbox_ports(self._ref))

    def url(self, port: int) -> str:
        """The proxy URL of ``port``: ``<daemon URL>/sandboxes/<id>/proxy/<port>/``.

        Built here, without a request. The daemon relays HTTP and WebSockets
        (``ws://`` with the same path) to ``127.0.0.1:<port>`` inside the
        sandbox, waking it first; every request needs the API key
        (``Authorization: Bearer <key>``; a WebSocket may send ``?token=<key>``
        instead). For a URL that works without a key, such as one to open in a
        browser, :meth:`publish` the port.
        """
        return _api.proxy_url(self._kiln.url, self._ref, port)

    async def publish(self, port: int, *, alias: str | None = None) -> str:
        """Serve ``port`` without an API key at ``<alias>.<publish domain>``; return
        that URL (``http://demo-3000.localhost:8080/`` with the default domain).

        ``alias`` is a lowercase DNS label; by default ``<sandbox name>-<port>``.
        Anyone who can reach the daemon can use the URL, and a request to it wakes
        the sandbox. Nothing needs to listen on the port yet. Raises
        :class:`Conflict` when the port is already published or the alias is
        taken, :class:`ValidationError` for a bad port or alias.
        """
        return await self._kiln._call(_api.publish(self._ref, port, alias))

    async def published(self) -> list[PublishedPort]:
        """The sandbox's published ports (port, alias, URL), by port."""
        return await self._kiln._call(_api.list_published(self._ref))

    async def unpublish(self, port: int) -> None:
        """Stop publishing ``port``: its URL answers 404 from now on (:class:`NotFound`
        when it is not published)."""
        await self._kiln._call(_api.unpublish(self._ref, port))

    async def shell(
        self,
        *,
        session_id: str | None = None,
        rows: int | None = None,
        cols: int | None = None,
        cmd: str | None = None,
        user: str | None = None,
    ) -> AsyncShellSession:
        """Open an interactive terminal (WebSocket) in the sandbox.

        Without ``session_id`` a new TTY session starts ``cmd`` (default: the
        login shell), as root with ``user="root"``; with it, the existing
        session is reattached and its scrollback replayed. Closing the
        :class:`AsyncShellSession` detaches; the session keeps running.
        """
        url = _api.shell_url(
            self._kiln.url,
            self._ref,
            session_id=session_id,
            rows=rows,
            cols=cols,
            cmd=cmd,
            user=user,
        )
        from .shell import AsyncShellSession  # noqa: PLC0415 - websockets is slow to import

        return await AsyncShellSession.connect(url, self._kiln._token)


class AsyncSandbox(SandboxInfo, _AsyncSandboxActions):
    """A sandbox: the daemon's view of it when fetched, plus methods acting on it.

    Fields are a snapshot and never change; methods that change the sandbox
    (:meth:`update`, :meth:`stop`, :meth:`start`, :meth:`refresh`) return a new
    :class:`AsyncSandbox`. Methods address the sandbox by ``id``, so they keep
    working after a rename.

    As a context manager (``async with``) it deletes the sandbox on exit, unless it
    was created with ``keep=True``; a sandbox already gone by then is fine::

        async with await k.sandboxes.create() as sb:
            await sb.exec("make test")
    """

    _kiln: AsyncKiln = PrivateAttr()
    _keep: bool = PrivateAttr(default=False)

    @classmethod
    def _wrap(cls, kiln: AsyncKiln, info: SandboxInfo, *, keep: bool = False) -> AsyncSandbox:
        sandbox = cls.model_construct(info.model_fields_set, **dict(info))
        sandbox._kiln = kiln
        sandbox._keep = keep
        return sandbox

    @property
    def _ref(self) -> str:
        return self.id

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._keep:
            return
        try:
            await self.delete()
        except NotFound:
            pass
        except KilnError as error:
            if exc is None:
                raise
            # The block's own error matters more; this one rides along on it.
            exc.add_note(f"kiln: deleting sandbox {self.name} failed too: {error}")


class AsyncSandboxRef(_AsyncSandboxActions):
    """A sandbox addressed by id or name, not fetched: ``kiln.sandboxes.ref("demo")``.

    It has every method of :class:`AsyncSandbox` but none of its fields, and costs
    no request to make; a missing sandbox shows up as :class:`NotFound` on the
    first call. Addressed by name, it follows the name (a rename breaks it).
    """

    __slots__ = ("_id_or_name", "_kiln")

    def __init__(self, kiln: AsyncKiln, id_or_name: str) -> None:
        self._kiln = kiln
        self._id_or_name = id_or_name

    def __repr__(self) -> str:
        return f"AsyncSandboxRef({self._id_or_name!r})"

    @property
    def _ref(self) -> str:
        return self._id_or_name


class AsyncSandboxes:
    """``kiln.sandboxes``: create, find, change and delete sandboxes."""

    def __init__(self, kiln: AsyncKiln) -> None:
        self._kiln = kiln

    async def create(
        self,
        *,
        name: str | None = None,
        cpus: int | None = None,
        memory_mb: int | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[str] | None = None,
        init: str | None = None,
        keep_hot: bool | None = None,
        image: str | None = None,
        template: str | None = None,
        volumes: Mapping[str, str] | Sequence[VolumeMount] | None = None,
        new_volumes: Sequence[NewVolume] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        on_expire: str | None = None,
        engine: str | None = None,
        runtime: str | None = None,
        network: NetworkPolicy | Mapping[str, Any] | None = None,
        saved_image: str | None = None,
        keep: bool = False,
    ) -> AsyncSandbox:
        """Create a sandbox and return once it is running.

        Every argument is optional; the daemon fills in defaults (1 CPU,
        512 MiB, a generated name, the default image). ``secrets`` names
        secrets whose values join ``env``; ``init`` is a shell script run as
        the TTY session ``init``; ``template`` is a template id to start from;
        ``volumes`` maps existing volume names to mount points, and
        ``new_volumes`` creates volumes along with the sandbox. ``labels`` are
        string pairs to find it by (``list(labels=...)``); after ``ttl_s``
        seconds the daemon destroys it, or stops it with ``on_expire="stop"``.
        ``engine`` is ``"qemu"`` (a microVM with its own kernel) or ``"docker"`` (a
        container); ``runtime``, for Docker only, ``"runc"`` or ``"runsc"`` (gVisor).
        Both default to the daemon's choice; a ``runtime`` with the QEMU engine is a
        :class:`ValidationError`. ``network`` is its egress policy (a
        :class:`NetworkPolicy`, or its dict); the daemon's default when absent.
        ``saved_image`` starts it from one of your saved images (see
        :meth:`AsyncSandbox.save_image`): its files, and its running processes where
        it has its memory; the image fixes image, shape, engine, env and init, so
        passing other ones is a :class:`ValidationError`.
        ``keep=True``: leaving the ``async with`` block does not delete it.
        """
        spec = _api.sandbox_spec(
            name=name,
            cpus=cpus,
            memory_mb=memory_mb,
            env=env,
            secrets=secrets,
            init=init,
            keep_hot=keep_hot,
            image=image,
            template=template,
            volumes=volumes,
            new_volumes=new_volumes,
            labels=labels,
            ttl_s=ttl_s,
            on_expire=on_expire,
            engine=engine,
            runtime=runtime,
            network=network,
            saved_image=saved_image,
        )
        info = await self._kiln._call(_api.create_sandbox(spec))
        return AsyncSandbox._wrap(self._kiln, info, keep=keep)

    def ref(self, id_or_name: str) -> AsyncSandboxRef:
        """A handle on the sandbox ``id_or_name`` without fetching it (no request)."""
        return AsyncSandboxRef(self._kiln, id_or_name)

    async def get(self, id_or_name: str) -> AsyncSandbox:
        """The sandbox with this id or name (:class:`NotFound` otherwise). Does not wake it."""
        return AsyncSandbox._wrap(self._kiln, await self._kiln._call(_api.get_sandbox(id_or_name)))

    async def list(self, *, labels: Mapping[str, str] | None = None) -> builtins.list[AsyncSandbox]:
        """All your sandboxes, or those carrying every one of ``labels``. Wakes none."""
        infos = await self._kiln._call(_api.list_sandboxes(labels))
        return [AsyncSandbox._wrap(self._kiln, i) for i in infos]

    async def update(
        self,
        id_or_name: str,
        *,
        name: str | None = None,
        keep_hot: bool | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = _api.UNCHANGED,
        on_expire: str | None = None,
    ) -> AsyncSandbox:
        """Change what is given (see :meth:`AsyncSandbox.update`); :class:`Conflict` if
        the new name is taken."""
        call = _api.update_sandbox(
            id_or_name,
            name=name,
            keep_hot=keep_hot,
            labels=labels,
            ttl_s=ttl_s,
            on_expire=on_expire,
        )
        return AsyncSandbox._wrap(self._kiln, await self._kiln._call(call))

    async def delete(self, id_or_name: str) -> None:
        """Destroy a sandbox and free its resources."""
        await self._kiln._call(_api.delete_sandbox(id_or_name))

    async def stop(self, id_or_name: str) -> AsyncSandbox:
        """Stop a sandbox: snapshotted to disk, or without ``capabilities.snapshots``
        its processes ended and its files kept (see :meth:`AsyncSandbox.stop`)."""
        return AsyncSandbox._wrap(self._kiln, await self._kiln._call(_api.stop_sandbox(id_or_name)))

    async def fork(self, id_or_name: str, *, name: str | None = None) -> AsyncSandbox:
        """A running copy of a sandbox (see :meth:`AsyncSandbox.fork`)."""
        info = await self._kiln._call(_api.fork_sandbox(id_or_name, name))
        return AsyncSandbox._wrap(self._kiln, info)

    async def save(self, id_or_name: str, name: str) -> SavedImage:
        """Save a sandbox as an image (see :meth:`AsyncSandbox.save_image`)."""
        return await self._kiln._call(_api.save_sandbox(id_or_name, name))

    async def start(self, id_or_name: str) -> AsyncSandbox:
        """Start a stopped sandbox: restored from its snapshot, or booted again."""
        info = await self._kiln._call(_api.start_sandbox(id_or_name))
        return AsyncSandbox._wrap(self._kiln, info)


# -- exec stream ----------------------------------------------------------------------


class AsyncExecStream:
    """The events of a streamed exec, parsed line by line as they arrive.

    Iterate it with ``async for`` to get :class:`Stdout`/:class:`Stderr`/:class:`Exit`
    events. The request is sent on first use. :meth:`close` (or leaving the
    ``async with`` block) before the end kills the command. After the
    :class:`Exit` event, :attr:`exit_code` holds the command's exit code.
    """

    def __init__(self, kiln: AsyncKiln, call: Call[None], *, exit_required: bool = True) -> None:
        self._kiln = kiln
        self._call = call
        self._exit_required = exit_required
        self._resp: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._closed = False
        #: The command's exit code, once the :class:`Exit` event was read.
        self.exit_code: int | None = None

    async def _open(self) -> AsyncIterator[str]:
        self._resp = await self._kiln._send_streaming(self._call)
        self._lines = self._resp.aiter_lines()
        return self._lines

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ExecEvent:
        if self._closed:
            raise StopAsyncIteration
        lines = self._lines if self._lines is not None else await self._open()
        while True:
            with map_exceptions(self._kiln.url):
                line = await anext(lines, None)
            if line is None:
                await self.close()
                if not self._exit_required:
                    raise StopAsyncIteration
                raise InvalidResponse("the exec stream ended without an exit event")
            event = parse_exec_event(line, "base64")
            if event is None:
                continue
            if isinstance(event, Exit):
                self.exit_code = event.exit_code
                await self.close()
            return event

    async def wait(self) -> int:
        """Read (and drop) the remaining output; return the exit code."""
        async for _ in self:
            pass
        if self.exit_code is None:
            raise InvalidResponse("the exec stream ended without an exit event")
        return self.exit_code

    async def close(self) -> None:
        """Stop reading; if the command still runs, the daemon kills it."""
        self._closed = True
        if self._resp is not None:
            await self._resp.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- background processes -----------------------------------------------------------


class AsyncOutputStream(AsyncExecStream):
    """A background process's output: the kept output, then live output, then one
    :class:`Exit`. Unlike an exec stream, closing it early only detaches this
    reader; the process keeps running. Without ``follow`` it ends after the
    output kept so far (with an :class:`Exit` only if the process has already
    exited)."""


class AsyncProcess:
    """A background process in a sandbox, by its guest pid.

    The fields (:attr:`running`, :attr:`exit_code`, ...) are as last seen;
    :meth:`refresh` fetches them again and :meth:`wait` updates them. Iterating
    over the handle with ``async for`` reads its output (kept output first, then
    live, then :class:`Exit`); leaving early only detaches::

        proc = await sb.processes.start("python3 -m http.server 8000")
        async for event in proc:
            print(event)
        await proc.kill()
    """

    def __init__(self, kiln: AsyncKiln, sandbox: str, info: ProcessInfo) -> None:
        self._kiln = kiln
        self._sandbox = sandbox
        self._info = info

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.exit_code}"
        return f"AsyncProcess(pid={self.pid}, cmd={list(self.cmd)!r}, {state})"

    @property
    def info(self) -> ProcessInfo:
        """The process as last seen (:meth:`refresh`, :meth:`wait` update it)."""
        return self._info

    @property
    def pid(self) -> int:
        return self._info.pid

    @property
    def cmd(self) -> tuple[str, ...]:
        return self._info.cmd

    @property
    def running(self) -> bool:
        return self._info.running

    @property
    def exit_code(self) -> int | None:
        return self._info.exit_code

    @property
    def started_at(self) -> datetime | None:
        return self._info.started_at

    @property
    def finished_at(self) -> datetime | None:
        return self._info.finished_at

    @property
    def tty(self) -> bool:
        return self._info.tty

    @property
    def session_id(self) -> str | None:
        """The TTY session's id (``None`` for a background process)."""
        return self._info.session_id

    @property
    def user(self) -> str | None:
        return self._info.user

    def to_dict(self) -> dict[str, Any]:
        return self._info.to_dict()

    async def refresh(self) -> Self:
        """Fetch the process's state again; returns this handle."""
        self._info = await self._kiln._call(_api.get_process(self._sandbox, self.pid))
        return self

    def output(self, *, follow: bool = True) -> AsyncOutputStream:
        """Its output: the kept output, then (with ``follow``) live output and the exit."""
        return AsyncProcesses(self._kiln, self._sandbox).output(self.pid, follow=follow)

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        async with self.output() as events:
            async for event in events:
                if isinstance(event, Exit):
                    await self._exited(event.exit_code)
                yield event

    # unasync: async-only
    async def wait(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - as the sync one
        """Read its output to the end; its exit code. :class:`Timeout` after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                async for event in self:
                    if isinstance(event, Exit):
                        return event.exit_code
        except TimeoutError:
            raise Timeout(f"process {self.pid} still runs after {timeout} s") from None
        raise InvalidResponse("the output stream ended without an exit event")

    # unasync: sync-only
    # # No asyncio.timeout here: the read timeout bounds each wait for a line, the deadline
    # # the whole wait.
    # def wait(self, timeout: float | None = None) -> int:
    #     """Read its output to the end; its exit code. :class:`Timeout` after ``timeout`` s."""
    #     deadline = None if timeout is None else time.monotonic() + timeout
    #     call = _api.process_output(self._sandbox, self.pid, timeout=timeout)
    #     try:
    #         with OutputStream(self._kiln, call) as events:
    #             for event in events:
    #                 if isinstance(event, Exit):
    #                     self._exited(event.exit_code)
    #                     return event.exit_code
    #                 if deadline is not None and time.monotonic() > deadline:
    #                     break
    #     except Timeout:
    #         pass  # no output within the timeout
    #     else:
    #         if deadline is None:
    #             raise InvalidResponse("the output stream ended without an exit event")
    #     raise Timeout(f"process {self.pid} still runs after {timeout} s")
    #
    # unasync: end

    async def _exited(self, code: int) -> None:
        try:
            await self.refresh()  # finished_at, as the sandbox saw it
        except KilnError:
            self._info = self._info.model_copy(update={"running": False, "exit_code": code})

    async def stdin(
        self, data: bytes | bytearray | memoryview | str, *, close: bool = False
    ) -> None:
        """Write ``data`` to its stdin (then close stdin, with ``close``)."""
        await AsyncProcesses(self._kiln, self._sandbox).stdin(self.pid, data, close=close)

    async def signal(self, signal: str = "TERM") -> None:
        """Send ``signal`` (TERM, KILL, INT, HUP, QUIT, USR1, USR2) to its process group."""
        await AsyncProcesses(self._kiln, self._sandbox).signal(self.pid, signal)

    async def kill(self) -> None:
        """SIGKILL its process group."""
        await self.signal("KILL")

    async def resize(self, rows: int, cols: int) -> None:
        """Set its terminal's size (it must have been started with ``tty``)."""
        await AsyncProcesses(self._kiln, self._sandbox).resize(self.pid, rows, cols)

    @property
    def tag(self) -> str | None:
        return self._info.tag


class AsyncProcesses:
    """``sandbox.processes``: commands that run in the background, detached from any
    connection, with their last 1 MiB of stdout and of stderr kept for readers."""

    def __init__(self, kiln: AsyncKiln, sandbox_id: str) -> None:
        self._kiln = kiln
        self._id = sandbox_id

    async def start(
        self,
        cmd: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = True,
        tag: str | None = None,
        tty: bool = False,
        rows: int | None = None,
        cols: int | None = None,
    ) -> AsyncProcess:
        """Start ``cmd`` (argv list, or a string for ``sh -c``) in the background.

        ``user`` is ``"root"`` or the sandbox user (the default). A command that
        cannot start (not found, not executable, bad ``cwd``) raises
        :class:`ValidationError`.
        """
        body = _api.process_body(
            cmd,
            env=env,
            cwd=cwd,
            user=user,
            stdin=stdin,
            tag=tag,
            tty=tty,
            rows=rows,
            cols=cols,
        )
        info = await self._kiln._call(_api.start_process(self._id, body))
        return AsyncProcess(self._kiln, self._id, info)

    async def list(self) -> builtins.list[AsyncProcess]:
        """Background processes and TTY sessions, running and recently finished."""
        infos = await self._kiln._call(_api.list_processes(self._id))
        return [AsyncProcess(self._kiln, self._id, i) for i in infos]

    async def get(self, pid: int) -> AsyncProcess:
        """The process ``pid`` (:class:`NotFound` if the sandbox has none such)."""
        info = await self._kiln._call(_api.get_process(self._id, pid))
        return AsyncProcess(self._kiln, self._id, info)

    def output(self, pid: int, *, follow: bool = True) -> AsyncOutputStream:
        """Its output events: kept output, then (with ``follow``) live output and Exit."""
        call = _api.process_output(self._id, pid, follow=follow)
        return AsyncOutputStream(self._kiln, call, exit_required=follow)

    async def stdin(
        self, pid: int, data: bytes | bytearray | memoryview | str, *, close: bool = False
    ) -> None:
        """Write to its stdin (:class:`Conflict` once it has finished)."""
        call = _api.process_stdin(self._id, pid, close=close)
        await self._kiln._call(call, content=_api.stdin_bytes(data))

    async def signal(self, pid: int, signal: str = "TERM") -> None:
        """Send a signal by name (:class:`Conflict` once it has finished)."""
        await self._kiln._call(_api.signal_process(self._id, pid, signal))

    async def kill(self, pid: int) -> None:
        """SIGKILL its process group."""
        await self.signal(pid, "KILL")

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        """Set the terminal size of a process started with ``tty`` (:class:`Conflict`
        for one without a terminal, or once it has finished)."""
        await self._kiln._call(_api.resize_process(self._id, pid, rows, cols))


# -- files and sessions -------------------------------------------------------------


# unasync: async-only
async def _aiter(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    # Local file reads block briefly; an upload is bounded by the network anyway.
    for chunk in chunks:
        yield chunk


# unasync: end
class AsyncFiles:
    """``sandbox.files``: the sandbox's filesystem."""

    def __init__(self, kiln: AsyncKiln, sandbox_id: str) -> None:
        self._kiln = kiln
        self._id = sandbox_id

    async def read(
        self, path: str, *, offset: int = 0, limit: int = 0, max_bytes: int = 0
    ) -> FileContent:
        """Read a file: ``.data`` (bytes), ``.size`` (whole file), ``.truncated``.

        ``offset`` is a 1-based line number to start at, ``limit`` a maximum
        number of lines, ``max_bytes`` a maximum number of bytes (0: no limit).
        """
        call = _api.read_file(self._id, path, offset=offset, limit=limit, max_bytes=max_bytes)
        return await self._kiln._call(call)

    async def write(
        self,
        path: str,
        data: bytes | bytearray | memoryview | str | IO[bytes],
        *,
        mode: int | str | None = None,
    ) -> None:
        """Write ``data`` (bytes, text as UTF-8, or a binary file object) to ``path`` atomically.

        Parent directories are created. ``mode`` is ``0o644`` or ``"0644"``.
        A seekable file object is streamed from its current position.
        """
        size, content = _api.upload_body(data)
        # unasync: async-only
        if not isinstance(content, bytes):
            content = _aiter(content)
        # unasync: end
        await self._kiln._call(_api.write_file(self._id, path, size, mode), content=content)

    async def stat(self, path: str) -> FileStat:
        """Size, mode and type of ``path`` (:class:`NotFound` if missing)."""
        return await self._kiln._call(_api.stat_file(self._id, path))

    async def ls(self, path: str, *, depth: int | None = None) -> FileListing:
        """A directory's entries sorted by name (``.entries``; ``.truncated`` past 10,000).

        ``depth`` 2 and more also lists subdirectories; entries then have ``.path``.
        """
        return await self._kiln._call(_api.list_files(self._id, path, depth))

    async def mkdir(
        self, path: str, *, parents: bool = True, mode: int | str | None = None
    ) -> bool:
        """Create a directory (and missing parents): True, or False if it existed.

        :class:`Conflict` when a file is in the way."""
        return await self._kiln._call(_api.make_dir(self._id, path, parents, mode))

    async def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileInfo:
        """Rename ``source`` to ``destination`` (missing parents are created).

        :class:`Conflict` when the destination exists, unless ``overwrite``."""
        return await self._kiln._call(_api.move_file(self._id, source, destination, overwrite))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, a symlink or an empty directory; ``recursive``: any tree."""
        await self._kiln._call(_api.remove_file(self._id, path, recursive))

    def watch(self, path: str, *, recursive: bool = False) -> AsyncFileWatch:
        """A directory's changes (``async for event in ...``: ``.name``, ``.type`` one of
        create, write, remove, rename, chmod) until the directory is removed or the
        watch is closed (``await close()`` or leaving the ``async with`` block)."""
        return AsyncFileWatch(self._kiln, _api.watch_files(self._id, path, recursive))

    def download_archive(self, path: str) -> AsyncArchiveDownload:
        """``path`` (a file, a symlink or a directory tree) as a tar stream, like
        ``docker cp``: ``async with sb.files.download_archive("/etc") as tar:`` then
        ``async for chunk in tar``. Its top member is named ``.root``; ``.stat`` is
        the path's. :class:`NotFound` for a missing path."""
        return AsyncArchiveDownload(self._kiln, _api.download_archive(self._id, path), path)

    async def upload_archive(
        self, path: str, data: bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]
    ) -> int:
        """Extract a tar stream (bytes, a binary file object or an iterable of chunks,
        sent as it is read) into the existing directory ``path``: the number of
        members. Members belong to the sandbox user and keep their modes; an archive
        reaching outside ``path`` is refused (:class:`ValidationError`)."""
        content = _api.archive_body(data)
        # unasync: async-only
        if not isinstance(content, bytes):
            content = _aiter(content)
        # unasync: end
        # A streamed body cannot be sent twice: no retries.
        kiln = self._kiln.with_options(retries=0)
        return await kiln._call(_api.upload_archive(self._id, path), content=content)


class AsyncFileWatch:
    """The events of a directory watch, parsed line by line as they arrive."""

    def __init__(self, kiln: AsyncKiln, call: Call[None]) -> None:
        self._kiln = kiln
        self._call = call
        self._resp: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._closed = False

    async def _open(self) -> AsyncIterator[str]:
        self._resp = await self._kiln._send_streaming(self._call)
        self._lines = self._resp.aiter_lines()
        return self._lines

    async def start(self) -> Self:
        """Start watching now (otherwise the first iteration does): after this,
        changes are seen. Raises :class:`NotFound` for a missing directory."""
        if self._lines is None:
            await self._open()
        return self

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FileEvent:
        if self._closed:
            raise StopAsyncIteration
        lines = self._lines if self._lines is not None else await self._open()
        while True:
            with map_exceptions(self._kiln.url):
                line = await anext(lines, None)
            if line is None:
                await self.close()
                raise StopAsyncIteration
            event = models.parse_file_event(line)
            if event is not None:
                return event

    async def close(self) -> None:
        """Stop watching."""
        self._closed = True
        if self._resp is not None:
            await self._resp.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncArchiveDownload:
    """A tar stream being downloaded (``async with``, then ``async for`` its chunks)."""

    def __init__(self, kiln: AsyncKiln, call: Call[None], path: str) -> None:
        self._kiln = kiln
        self._call = call
        self._path = path
        self._resp: httpx.Response | None = None
        #: The path's size, mode and type (once open).
        self.stat = FileStat(path=path, size=0, mode="", is_dir=False)
        #: The name of the archive's top member (once open).
        self.root = ""

    async def open(self) -> Self:
        """Start the download (otherwise ``async with`` does): :class:`NotFound` here."""
        if self._resp is None:
            self._resp = await self._kiln._send_streaming(self._call)
            self.stat, self.root = _api.archive_stat(self._resp, self._path)
        return self

    async def __aiter__(self) -> AsyncIterator[bytes]:
        await self.open()
        assert self._resp is not None
        with map_exceptions(self._kiln.url):
            # unasync: async-only
            async for chunk in self._resp.aiter_bytes():
                yield chunk
            # unasync: sync-only
            # yield from self._resp.iter_bytes()
            # unasync: end

    async def close(self) -> None:
        if self._resp is not None:
            await self._resp.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncSessions:
    """``sandbox.sessions``: exec and TTY sessions inside the sandbox."""

    def __init__(self, kiln: AsyncKiln, sandbox_id: str) -> None:
        self._kiln = kiln
        self._id = sandbox_id

    async def list(self) -> builtins.list[SessionInfo]:
        """Every session: id, argv, tty, running, attached, exit code."""
        return await self._kiln._call(_api.list_sessions(self._id))

    async def kill(self, session_id: str) -> None:
        """SIGKILL a session's process group."""
        await self._kiln._call(_api.kill_session(self._id, session_id))


# -- secrets, volumes, templates -------------------------------------------------------


class AsyncNodes:
    """``kiln.nodes``: the daemons of a cluster (admins only; a single daemon has none)."""

    def __init__(self, kiln: AsyncKiln) -> None:
        self._kiln = kiln

    async def list(self) -> builtins.list[NodeInfo]:
        """Every node, with its status (``active``, ``draining`` or ``lost``) and load."""
        return await self._kiln._call(_api.list_nodes())

    async def get(self, name: str) -> NodeInfo:
        return await self._kiln._call(_api.get_node(name))

    async def drain(self, name: str) -> NodeInfo:
        """Place no new sandbox on ``name``; its running sandboxes stay, its stopped
        ones move to other nodes (with a ``cluster.shared_dir``)."""
        return await self._kiln._call(_api.set_node_draining(name, True))

    async def undrain(self, name: str) -> NodeInfo:
        """Let ``name`` take new sandboxes again."""
        return await self._kiln._call(_api.set_node_draining(name, False))

    async def delete(self, name: str) -> None:
        """Forget ``name`` (refused while live sandboxes are on it)."""
        await self._kiln._call(_api.delete_node(name))


class AsyncSecrets:
    """``kiln.secrets``: named values, encrypted at rest, never returned."""

    def __init__(self, kiln: AsyncKiln) -> None:
        self._kiln = kiln

    async def set(self, name: str, value: str) -> None:
        """Create or replace the secret ``name``."""
        await self._kiln._call(_api.set_secret(name, value))

    async def list(self) -> builtins.list[Secret]:
        """Secret names and timestamps (never values)."""
        return await self._kiln._call(_api.list_secrets())

    async def delete(self, name: str) -> None:
        """Delete the secret ``name``."""
        await self._kiln._call(_api.delete_secret(name))


class AsyncVolumes:
    """``kiln.volumes``: ext4 volumes that outlive sandboxes."""

    def __init__(self, kiln: AsyncKiln) -> None:
        self._kiln = kiln

    async def create(self, name: str, *, size_mb: int) -> Volume:
        """Create an empty volume of ``size_mb`` MiB."""
        return await self._kiln._call(_api.create_volume(name, size_mb))

    async def list(self) -> builtins.list[Volume]:
        """All your volumes."""
        return await self._kiln._call(_api.list_volumes())

    async def get(self, name: str) -> Volume:
        """The volume ``name``."""
        return await self._kiln._call(_api.get_volume(name))

    async def delete(self, name: str) -> None:
        """Delete a volume (:class:`Conflict` while a live sandbox uses it)."""
        await self._kiln._call(_api.delete_volume(name))


class AsyncSavedImages:
    """``kiln.saved_images``: your sandboxes saved as images (nobody else sees them)."""

    def __init__(self, kiln: AsyncKiln) -> None:
        self._kiln = kiln

    async def list(self) -> builtins.list[SavedImage]:
        """All your saved images."""
        return await self._kiln._call(_api.list_saved_images())

    async def get(self, name: str) -> SavedImage:
        """The saved image ``name``."""
        return await self._kiln._call(_api.get_saved_image(name))

    async def delete(self, name: str) -> None:
        """Delete it and its files; sandboxes made from it go on."""
        await self._kiln._call(_api.delete_saved_image(name))


class AsyncTemplates:
    """``kiln.templates``: named sandbox specs."""

    def __init__(self, kiln: AsyncKiln) -> None:
        self._kiln = kiln

    async def create(
        self,
        name: str,
        *,
        cpus: int | None = None,
        memory_mb: int | None = None,
        env: Mapping[str, str] | None = None,
        init: str | None = None,
        image: str | None = None,
        volumes: Mapping[str, str] | Sequence[VolumeMount] | None = None,
    ) -> Template:
        """Save a sandbox spec under ``name``; pass its id as ``sandboxes.create(template=)``."""
        spec = _api.template_spec(
            name=name,
            cpus=cpus,
            memory_mb=memory_mb,
            env=env,
            init=init,
            image=image,
            volumes=volumes,
        )
        return await self._kiln._call(_api.create_template(spec))

    async def list(self) -> builtins.list[Template]:
        """All your templates."""
        return await self._kiln._call(_api.list_templates())

    async def get(self, template_id: str) -> Template:
        """The template with this id."""
        return await self._kiln._call(_api.get_template(template_id))

    async def delete(self, template_id: str) -> None:
        """Delete a template."""
        await self._kiln._call(_api.delete_template(template_id))


class AsyncImages:
    """``kiln.images``: what a sandbox can start from (``sandboxes.create(image=...)``)."""

    def __init__(self, kiln: AsyncKiln) -> None:
        self._kiln = kiln

    async def build(
        self,
        name: str,
        *,
        packages: Sequence[str] = (),
        files: Sequence[Mapping[str, str]] | None = None,
        env: Mapping[str, str] | None = None,
        dockerfile: str | None = None,
        context: bytes | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> ImageInfo:
        """Build ``name``: Debian ``packages`` and ``files`` (``{"path", "content",
        "mode"}``) on top of ``minimal``; ``env``, the environment of its sandboxes.
        Or from a ``dockerfile`` (its text, ``FROM minimal``) and its build
        ``context`` (a tar archive, at most 16 MiB), built by the daemon's Docker
        engine; its ENV is the image's environment. Yours, or global when you are
        an admin.

        Takes a minute or more when its packages are new (seconds when cached);
        ``progress`` gets each progress line as the daemon reports it. A failed
        build raises with the failing step and the daemon's build log path.
        """
        body = _api.image_body(name, packages, files, env, dockerfile=dockerfile, context=context)
        if progress is None:
            return await self._kiln._call(_api.build_image(body))
        resp = await self._kiln._send_streaming(_api.build_image_streamed(body))
        try:
            with map_exceptions(self._kiln.url):
                async for line in resp.aiter_lines():
                    event = _api.parse_build_event(line)
                    if event is None:
                        continue
                    if event["type"] == "progress":
                        progress(str(event.get("message", "")))
                        continue
                    return _api.build_result(event)
        finally:
            await resp.aclose()
        raise InvalidResponse("the build stream ended without a result")

    async def list(self) -> builtins.list[ImageInfo]:
        """Built-in tiers, global images and your own."""
        return await self._kiln._call(_api.list_images())

    async def get(self, name: str, *, owner: str | None = None) -> ImageInfo:
        """The image ``name`` (:class:`NotFound` for unknown ones and other users');
        admins: ``owner`` (a user's id or name) for that user's image."""
        return await self._kiln._call(_api.get_image(name, owner))

    async def delete(self, name: str, *, owner: str | None = None) -> None:
        """Delete your image (admins: a global one, or ``owner``'s);
        :class:`Conflict` while a sandbox uses it."""
        await self._kiln._call(_api.delete_image(name, owner))


__all__ = [
    "AsyncExecStream",
    "AsyncFiles",
    "AsyncImages",
    "AsyncKiln",
    "AsyncOutputStream",
    "AsyncProcess",
    "AsyncProcesses",
    "AsyncSandbox",
    "AsyncSandboxRef",
    "AsyncSandboxes",
    "AsyncSecrets",
    "AsyncSessions",
    "AsyncTemplates",
    "AsyncVolumes",
]
