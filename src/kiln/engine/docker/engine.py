"""The Docker engine: each sandbox a container whose PID 1 is kiln's guest agent.

The container runs the same image contents as a VM (kiln's rootfs, imported
once per base, :mod:`.images`) with the agent zipapp and its config
bind-mounted read-only, on a bridge of kiln's own with an address from kiln's
pool, so the host reaches the agent over TCP exactly as it reaches a VM's
(the same :class:`~kiln.agent_client.AgentClient`, the same egress rules).
A runc container starts with ``--network none`` and gets its eth0 from the
engine, a veth into its namespace while the agent starts (dockerd's
user-defined network would set up its embedded DNS at every start: ~140 ms of
a 380 ms ``docker start``, measured); a runsc one reads its interfaces as it
starts, before the engine could add one, so it is on dockerd's network on the
same bridge (:attr:`~.record.Record.own_network`).

Runtimes, per sandbox: ``runc`` (native speed, the host kernel's isolation)
and ``runsc`` (gVisor: a user-space kernel between the sandbox and the host).
Warm is ``docker pause`` on both. Cold would need a checkpoint of the
processes, and neither runtime can make one of a sandbox here: runc's (CRIU)
fails on these kernels, and runsc (Debian's 2022 release) refuses to save a
listening TCP socket that a process waits on ("endpoint still has waiters upon
save") -- the agent always is one -- and any connection in TIME_WAIT. So a
Docker sandbox has no snapshots: the thermal manager never takes it cold, and
a stop ends its processes and keeps its files (:mod:`kiln.engine.states`,
``snapshots=False``); a start boots it again (without re-running its init).

A create whose spec fits a pooled shape takes a paused, warmed-up container of
the warm pool instead (:mod:`.pool`), which becomes the sandbox.

The dockerd is kiln's private one (:class:`~.daemon.Dockerd`), started on first
use or adopted when it still runs; like QEMU processes, containers outlive a
daemon restart and are re-adopted (:meth:`DockerEngine.import_state`). A
container that exited while its sandbox was running (a host reboot, dockerd
killed) still holds its files in its writable layer: the sandbox is running
and cold, and its next use starts the container again (a reboot: its files
kept, its processes lost); so is one whose container's PID 1 exits or is
killed while the daemon runs. One whose container is gone altogether lost its
files with it: it is in error.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import json
import logging
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from kiln.agent_client import (
    CONTROL_PORT,
    FORWARD_PORT,
    AgentClient,
    AgentConnectError,
    AgentConnectionLost,
    AgentError,
    AgentTimeout,
    Endpoint,
)
from kiln.engine.base import (
    SANDBOX_ID_RE,
    SandboxInfo,
    SandboxSpec,
    SavedImage,
    guest_hostname,
)
from kiln.engine.boots import STATE_KEY, BootReason, LastBoot, boot_reason
from kiln.engine.dial import agent_dialer
from kiln.engine.errors import (
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    InvalidSpec,
    InvalidState,
    SandboxCrashed,
    SandboxNotFound,
)
from kiln.engine.states import (
    ADOPTED,
    CREATED,
    Action,
    Found,
    Op,
    State,
    Status,
    Thermal,
    Transition,
    plan,
)
from kiln.faults import crash_point
from kiln.network import IPPool, Network, NetworkError
from kiln.network.firewall import Firewall

from ..guard import Guard
from ..undo import Undo
from . import containers, hostname, images
from .box import CAPABILITIES, Box, pid_alive
from .config import RUNTIMES, DockerEngineConfig
from .containers import docker_errors
from .daemon import Dockerd, probe, sdk_client
from .errors import DockerdError
from .host import set_cpu_shares
from .pool import LOW_CPU_SHARES, NORMAL_CPU_SHARES, WarmPool
from .record import (
    CONFIG_FILE,
    Record,
    container_name,
    guest_config,
    volume_name,
    write_atomic,
)

log = logging.getLogger(__name__)

ENGINE_NAME = "docker"
#: Runtimes whose containers get their eth0 from the engine rather than from dockerd
#: (see :attr:`~.record.Record.own_network`): runc's container reads nothing of its
#: network at start, so the veth can come while the agent starts.
OWN_NETWORK = frozenset({"runc"})
_BOOT_POLL = 0.01
#: A connect made before the container's interface is up goes unanswered (no RST)
#: until it times out, so attempts are short (measured: runsc creates 0.3 s sooner
#: than with 0.5 s); after a few seconds, for a host too loaded to answer that fast,
#: longer.
_BOOT_CONNECT_TIMEOUT = 0.05
_BOOT_CONNECT_PATIENT = (3.0, 0.5)
#: The repository of saved images in kiln's dockerd (tag: the saved image id).
SAVED_REPOSITORY = "kiln-saved"
#: The label of a saved image holding the shape (JSON) a create from it must have.
SAVED_SHAPE_LABEL = "org.kiln.saved-shape"
_STOP_TIMEOUT = 5  # seconds the agent gets to end its processes on a stop


class DockerEngine:
    """Sandboxes as containers of a private dockerd (an :class:`~kiln.engine.base.Engine`)."""

    name = ENGINE_NAME

    def __init__(self, config: DockerEngineConfig, firewall: Firewall | None = None) -> None:
        self.config = config
        self._guard = Guard(firewall)
        self._network = Network(config.network)
        self._pool = IPPool(config.network.subnet)
        self._dockerd = Dockerd(config.dockerd)
        self._client: Any = None
        self._runtimes: tuple[str, ...] = ()
        self._boxes: dict[str, Box] = {}
        self._ready_lock = asyncio.Lock()
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._images: dict[str, str] = {}
        self._agent: Path | None = None
        self._agent_lock = asyncio.Lock()
        self._warm = WarmPool(
            config,
            self._guard,
            self._pool,
            make=lambda spec, runtime: self._make(spec, runtime, member=True),
            docker=self._ensure_ready,
            remove=self._remove,
            client_for=self._client_for,
            write_files=self._write_files,
        )

    # ------------------------------------------------------------------ set-up

    @property
    def dockerd(self) -> Dockerd:
        return self._dockerd

    @property
    def pool(self) -> IPPool:
        return self._pool

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes this engine can use (known once it is ready)."""
        return self._runtimes

    async def ready(self) -> None:
        """Start (or adopt) the private dockerd and the network now, not at the first
        create; EngineUnavailable says why it cannot run."""
        await self._ensure_ready()

    async def docker_client(self) -> Any:
        """The docker SDK client of the engine's dockerd (started if need be)."""
        return await self._ensure_ready()

    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        """``docker inspect`` of the sandbox's container."""
        box = self._get(sandbox_id)
        client = await self._ensure_ready()
        with docker_errors(f"inspecting the container of {sandbox_id}"):
            attrs: dict[str, Any] = await asyncio.to_thread(
                client.api.inspect_container, box.record.container
            )
        return attrs

    def forget(self, sandbox_id: str) -> None:
        """Drop the sandbox from memory only, its container and files left as they are:
        what a daemon crash loses (for recovery and orphan tests)."""
        box = self._boxes.pop(sandbox_id, None)
        if box is not None:
            self._pool.release(box.record.ip)

    def _never_used(self) -> bool:
        """No dockerd of ours has ever run here: it holds nothing to clean up or delete."""
        return self._client is None and not self.config.dockerd.data_root.exists()

    async def _ensure_ready(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._ready_lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._start)
        return self._client

    def _start(self) -> Any:
        try:
            self._network.setup()
        except NetworkError as exc:
            raise EngineUnavailable(f"Docker engine: sandbox network: {exc}") from exc
        try:
            if self.config.start_dockerd:
                info = self._dockerd.start()
                client = self._dockerd.client()
                how = "adopted" if self._dockerd.adopted else "started"
            else:
                info = probe(self.config.dockerd.url)
                client = sdk_client(self.config.dockerd.url)
                how = "shared"
        except DockerdError as exc:
            raise EngineUnavailable(f"Docker engine: {exc}") from exc
        self._runtimes = tuple(r for r in RUNTIMES if r in info.runtimes)
        with docker_errors("setting up the Docker network"):
            containers.ensure_network(client, self.config, self._pool.subnet)
        log.info(
            "Docker engine ready: dockerd %s (%s), runtimes %s",
            info.version,
            how,
            ", ".join(self._runtimes),
        )
        return client

    async def _image(self, tier: str) -> str:
        ref = self._images.get(tier)
        if ref is not None:
            return ref
        client = await self._ensure_ready()
        lock = self._image_locks.setdefault(tier, asyncio.Lock())
        async with lock:
            ref = self._images.get(tier)
            if ref is None:
                with docker_errors(f"importing the {tier} image"):
                    try:
                        ref = await asyncio.to_thread(
                            images.ensure_image,
                            client,
                            tier,
                            image_dir=self.config.image_dir,
                            progress=lambda m: log.info("%s", m),
                        )
                    except DockerdError as exc:
                        raise EngineUnavailable(str(exc)) from exc
                self._images[tier] = ref
        return ref

    async def _agent_zipapp(self) -> Path:
        """The guest agent's zipapp, built once per engine: finding its digest means
        building it (50-100 ms), and the agent's code cannot change under a daemon."""
        async with self._agent_lock:
            if self._agent is None:
                self._agent = await asyncio.to_thread(images.agent_zipapp, self.config.state_dir)
        return self._agent

    # ------------------------------------------------------------------ lookup, info

    def _get(self, sandbox_id: str) -> Box:
        box = self._boxes.get(sandbox_id)
        if box is None or box.destroyed:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r} in the Docker engine")
        return box

    def _info(self, box: Box) -> SandboxInfo:
        return SandboxInfo.of(
            box.record.spec,
            ENGINE_NAME,
            box.state,
            box.record.ip,
            has_snapshot=False,  # its stop keeps files, never memory
            capabilities=box.capabilities,
            runtime=box.record.runtime,
            last_boot=box.last_boot,
            problem=box.problem,
        )

    def _plan(self, op: Op, box: Box) -> Transition:
        return plan(op, box.state, box.sandbox_id, snapshots=box.capabilities.snapshots)

    def _notice_death(self, box: Box) -> bool:
        """Apply the death of a sandbox whose container's process vanished; True if it
        had. Its files are in the container's writable layer: it is running and cold,
        and its next use starts the container again (a reboot: files kept, processes
        lost). Whether the container is still there is checked by that boot (this
        runs in the lock-free observers too, which cannot ask dockerd)."""
        if box.state.live and not pid_alive(box.pid):
            log.warning(
                "container of sandbox %s (pid %s) is gone; it boots again on its next use",
                box.sandbox_id,
                box.pid,
            )
            box.pid = None
            box.state = self._plan(Op.CRASH, box).next
            return True
        return False

    def _observe(self, box: Box) -> None:
        if not box.lock.locked():  # a transition in progress changes pid and state in steps
            self._notice_death(box)

    def thermal(self, sandbox_id: str) -> Thermal:
        box = self._get(sandbox_id)
        self._observe(box)
        return box.state.thermal

    def info(self, sandbox_id: str) -> SandboxInfo:
        box = self._get(sandbox_id)
        self._observe(box)
        return self._info(box)

    def list(self) -> builtins.list[SandboxInfo]:
        out = []
        for box in builtins.list(self._boxes.values()):
            if not box.destroyed:
                self._observe(box)
                out.append(self._info(box))
        return out

    def client(self, sandbox_id: str) -> AgentClient:
        """The agent client of a sandbox without waking it (for callers that know)."""
        return self._get(sandbox_id).client

    def _client_for(self, record: Record, connect_timeout: float | None = None) -> AgentClient:
        ns = self.config.network.netns
        timeout = connect_timeout or self.config.agent_timeout
        endpoint = Endpoint(
            agent_dialer(ns, record.ip, CONTROL_PORT, timeout),
            agent_dialer(ns, record.ip, FORWARD_PORT, timeout),
            f"agent of {record.sandbox_id} at {record.ip}",
        )
        return AgentClient(
            endpoint, record.token, connect_timeout=timeout, auth_timeout=self.config.agent_timeout
        )

    # ------------------------------------------------------------------ create

    def _check_spec(self, spec: SandboxSpec) -> str:
        spec.validate()
        if spec.engine not in (None, ENGINE_NAME):
            raise InvalidSpec(f"the Docker engine cannot run a {spec.engine} sandbox")
        runtime = spec.runtime or self.config.runtime
        if runtime not in RUNTIMES:
            raise InvalidSpec(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if len({v.name for v in spec.volumes}) != len(spec.volumes):
            raise InvalidSpec("a volume is listed twice")
        if spec.sandbox_id in self._boxes and not self._boxes[spec.sandbox_id].destroyed:
            raise InvalidState(f"sandbox {spec.sandbox_id!r} already exists")
        return runtime

    async def prepare(self, spec: SandboxSpec) -> None:
        """Image and agent of ``spec``'s shape, and its warm pool (``pool_size``)."""
        runtime = self._check_spec(spec)
        await self._image(spec.image)
        await self._agent_zipapp()
        self._warm.start(spec, runtime)

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        runtime = self._check_spec(spec)
        box = await self._warm.claim(spec, runtime)
        if box is None:
            box = await self._make(spec, runtime)
            # A shape that is used gets a pool (when pool_size asks for one).
            self._warm.start(spec, runtime)
        self._boxes[box.sandbox_id] = box
        log.info("sandbox %s created (docker, %s) at %s", box.sandbox_id, runtime, box.record.ip)
        return self._info(box)

    @property
    def warm_pool(self) -> WarmPool:
        return self._warm

    async def _make(self, spec: SandboxSpec, runtime: str, *, member: bool = False) -> Box:
        """A new container for ``spec``, started, its agent answering: a sandbox (in
        the engine's table from before its start, for the observers) or, with
        ``member``, a warm-pool member (in no table: the pool holds it)."""
        client = await self._ensure_ready()
        if runtime not in self._runtimes:
            raise EngineUnavailable(
                f"runtime {runtime} is not available in kiln's dockerd (it has "
                f"{', '.join(self._runtimes) or 'none'}); install gVisor (apt-get install runsc)"
            )
        if spec.snapshot is not None:
            image = await self._saved_image(client, spec)
        else:
            image = await self._image(spec.image)
        agent = await self._agent_zipapp()
        sid = spec.sandbox_id
        undo = Undo()
        try:
            try:
                ip = self._pool.allocate(sid)
            except NetworkError as exc:
                raise EngineError(f"no address for sandbox {sid}: {exc}") from exc
            undo.push("release the address", self._releaser(ip))
            # A container has no port of its own to pin: it cannot forge its address
            # or MAC without CAP_NET_ADMIN / CAP_NET_RAW, which it does not get. The
            # rules are written while the container is made; it starts after them.
            admission = self._guard.admit_soon(spec, ip)
            undo.push("remove the firewall rules", admission.undo)
            directory = self.config.sandboxes_dir / sid
            await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=False)
            undo.push("remove the sandbox directory", self._remover(directory))
            record = Record(
                spec=spec,
                runtime=runtime,
                token=secrets.token_hex(16),
                ip=ip,
                image=image,
                agent=str(agent),
                created_at=time.time(),
                own_network=runtime in OWN_NETWORK,
            )
            created = await asyncio.to_thread(containers.make_volumes, client, spec)
            for volume in created:
                undo.push(f"remove volume {volume}", self._volume_remover(client, volume))
            record.created_volumes = tuple(created)
            await asyncio.to_thread(self._write_files, record, directory)
            with docker_errors(f"creating the container of {sid}"):
                await asyncio.to_thread(
                    containers.create_container,
                    client,
                    self.config,
                    record,
                    directory,
                    self._network.dns_servers(),
                    cpu_shares=LOW_CPU_SHARES if member else None,
                    setter=hostname.setter_mount(runtime) if member else None,
                )
            undo.push("remove the container", self._container_remover(client, record.container))
            if record.own_network:
                undo.push("remove its veth", self._veth_remover(sid))
            crash_point("docker.create.container")
            box = Box(record, directory, CREATED.next, self._client_for(record))
            if not member:
                self._boxes[sid] = box
                undo.push("forget the sandbox", self._forgetter(sid))
            async with box.lock:
                await admission.wait()
                await self._boot(box, client)
                box.last_boot = LastBoot.now(BootReason.CREATED)
        except BaseException:
            await asyncio.shield(undo.run())
            raise
        return box

    def _write_files(self, record: Record, directory: Path) -> None:
        """``record.json`` in ``directory``, and the guest's ``config.json`` where its
        container's bind mount reads it (the member's directory, for a pooled one)."""
        record.save(directory)
        network = None
        if record.own_network:
            network = self._network.guest_network(record.ip, record.made_as)
        config = guest_config(record, network)
        config_dir = self.config.sandboxes_dir / record.made_as
        write_atomic(config_dir / CONFIG_FILE, json.dumps(config), mode=0o644)

    # ------------------------------------------------------------------ boot, wait

    async def _boot(self, box: Box, client: Any) -> None:
        """Start the container and wait for the agent; the caller holds the lock and
        applies the state."""
        with docker_errors(f"starting the container of {box.sandbox_id}"):
            box.pid = await asyncio.to_thread(containers.start, client, box.record.container)
        await self._plumb(box, client)
        if box.record.member is not None:
            # Docker starts it with the member's host name, at every start.
            await self._reapply_claim(box, client)
        await self._wait_agent(box, client, self.config.boot_timeout)

    async def _reapply_claim(self, box: Box, client: Any) -> None:
        """The sandbox's host name in its running container (see :mod:`.hostname`), and
        its CPU weight in Docker's config (see :mod:`.pool`)."""
        record = box.record
        old, new = guest_hostname(record.made_as), guest_hostname(record.spec.name)
        pid = box.pid
        with docker_errors(f"setting the host name of {box.sandbox_id}"):
            if pid is None:
                raise OSError("its container has no process")
            attrs = await asyncio.to_thread(client.api.inspect_container, record.container)
            await asyncio.to_thread(
                functools.partial(
                    hostname.rename, record.runtime, client, attrs, pid, old=old, new=new
                )
            )
            if attrs["HostConfig"].get("CpuShares") == LOW_CPU_SHARES:
                # Its claim set the cgroup's weight only: Docker applied its own again.
                if record.runtime == "runc":
                    await asyncio.to_thread(
                        client.api.update_container, record.container, cpu_shares=NORMAL_CPU_SHARES
                    )
                else:
                    # runsc has no `update`: the cgroup's weight again, at every start.
                    await asyncio.to_thread(set_cpu_shares, pid, NORMAL_CPU_SHARES)

    async def _plumb(self, box: Box, client: Any) -> None:
        """Give a running container of its own network its eth0 (idempotent); the agent
        starts meanwhile, and waits for it before running the init script."""
        if not box.record.own_network:
            return
        pid = box.pid
        try:
            if pid is None:
                raise NetworkError("its container has no process")
            await asyncio.to_thread(
                self._network.attach_container, box.record.made_as, pid, box.record.ip
            )
        except NetworkError as exc:
            if not pid_alive(pid):
                logs = await asyncio.to_thread(containers.logs_tail, client, box.record.container)
                raise SandboxCrashed(
                    f"sandbox {box.sandbox_id} exited while starting: {logs}"
                ) from exc
            raise EngineError(f"cannot connect sandbox {box.sandbox_id}: {exc}") from exc

    async def _wait_agent(self, box: Box, client: Any, timeout: float) -> None:  # noqa: ASYNC109
        started = time.monotonic()
        deadline = started + timeout
        after, patient = _BOOT_CONNECT_PATIENT
        while True:
            wait = _BOOT_CONNECT_TIMEOUT if time.monotonic() - started < after else patient
            try:
                await self._client_for(box.record, wait).activity()
                return
            except (AgentConnectError, AgentConnectionLost, AgentTimeout) as exc:
                if not pid_alive(box.pid):
                    logs = await asyncio.to_thread(
                        containers.logs_tail, client, box.record.container
                    )
                    raise SandboxCrashed(
                        f"sandbox {box.sandbox_id} exited while starting: {logs}"
                    ) from exc
                if time.monotonic() > deadline:
                    logs = await asyncio.to_thread(
                        containers.logs_tail, client, box.record.container
                    )
                    raise SandboxCrashed(
                        f"the agent of {box.sandbox_id} did not answer within {timeout:.0f} s:"
                        f" {logs}"
                    ) from exc
            except AgentError as exc:
                raise EngineError(f"the agent of {box.sandbox_id} refused us: {exc}") from exc
            await asyncio.sleep(_BOOT_POLL)

    # ------------------------------------------------------------------ thermal

    async def pause(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.PAUSE)

    async def resume(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.RESUME)

    async def ensure_hot(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.ENSURE_HOT)

    async def fork(self, source_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Not on any runtime yet (``capabilities.fork`` is false): runc cannot
        checkpoint without CRIU ≥ 4.2, and runsc's checkpoint is not wired in."""
        box = self._get(source_id)
        raise InvalidState(
            f"sandbox {source_id} cannot be forked: the docker engine cannot fork a"
            f" {box.record.runtime} container (no checkpoint/restore); use the qemu engine"
        )

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        # Without snapshots there is no cold step, only the user's stop: its
        # processes end, its files stay.
        return self._info(await self._transition(sandbox_id, Op.STOP))

    async def start(self, sandbox_id: str) -> SandboxInfo:
        return self._info(await self._transition(sandbox_id, Op.START))

    async def agent(self, sandbox_id: str) -> AgentClient:
        box = await self._transition(sandbox_id, Op.ENSURE_HOT)
        return box.client

    async def _transition(self, sandbox_id: str, op: Op) -> Box:
        box = self._get(sandbox_id)
        async with box.lock:
            if box.destroyed:
                raise SandboxNotFound(f"sandbox {sandbox_id!r} was destroyed")
            died = self._notice_death(box)
            before = box.state
            try:
                step = self._plan(op, box)
            except InvalidState as exc:
                if not died:
                    raise
                # (A pause or resume of a container that just died.)
                raise SandboxCrashed(
                    f"sandbox {box.sandbox_id} crashed: its container exited; it boots again"
                    " on its next use (files kept, processes lost)"
                ) from exc
            if step.action is not Action.NOTHING:
                client = await self._ensure_ready()
                await self._carry_out(box, client, step.action)
            box.state = step.next
            reason = boot_reason(step.action, before, snapshots=box.capabilities.snapshots)
            if reason is not None:
                box.last_boot = LastBoot.now(reason)
        return box

    async def _carry_out(self, box: Box, client: Any, action: Action) -> None:
        name = box.record.container
        what = f"{action} of sandbox {box.sandbox_id}"
        match action:
            case Action.PAUSE:
                with docker_errors(what):
                    await asyncio.to_thread(containers.pause, client, name)
            case Action.RESUME:
                with docker_errors(what):
                    await asyncio.to_thread(containers.pause, client, name, resume=True)
            case Action.SHUTDOWN:
                with docker_errors(what):
                    if box.state.thermal is Thermal.WARM:
                        # A paused agent cannot end its processes; and runsc, stopped
                        # while paused, keeps the container "paused" in its state, so
                        # the next start fails with "id already in use".
                        await asyncio.to_thread(containers.pause, client, name, resume=True)
                    await asyncio.to_thread(client.api.stop, name, timeout=_STOP_TIMEOUT)
                crash_point("docker.stop.container_stopped")
                box.pid = None
            case Action.BOOT:
                await self._gone_is_lost(box, client)
                await self._boot(box, client)
            case _:
                raise AssertionError(f"unplanned action {action}")

    async def _gone_is_lost(self, box: Box, client: Any) -> None:
        """Before a boot: a sandbox whose container is gone lost its files with it (it
        was removed behind our back): it is in error, and this says so."""
        found, _ = await asyncio.to_thread(containers.find, client, box.record.container)
        if found is not Found.NOTHING:
            return
        box.problem = f"its container {box.record.container} is gone, and the files in it with it"
        box.state = self._plan(Op.LOST, box).next
        log.error("sandbox %s cannot boot again: %s", box.sandbox_id, box.problem)
        raise SandboxCrashed(
            f"sandbox {box.sandbox_id} cannot boot again: {box.problem}; it can only be deleted"
        )

    # ------------------------------------------------------------------ destroy

    async def destroy(self, sandbox_id: str) -> None:
        box = self._boxes.get(sandbox_id)
        if box is None or box.destroyed:
            return
        async with box.lock:
            if self._boxes.get(sandbox_id) is not box:
                return  # destroyed while we waited for the lock
            client = await self._ensure_ready()
            await self._remove(box, client)
            self._boxes.pop(sandbox_id, None)
        log.info("sandbox %s destroyed (docker)", sandbox_id)

    async def _remove(self, box: Box, client: Any, rules_of: str | None = None) -> None:
        """Remove a sandbox's (or pool member's) container, veth, rules (also those
        ``rules_of`` may hold), address and directories; the caller holds its lock."""
        record = box.record
        await asyncio.to_thread(containers.remove_container, client, record.container)
        crash_point("docker.destroy.container_removed")
        if record.own_network:
            await asyncio.to_thread(self._network.detach_container, record.made_as)
        box.destroyed = True
        box.pid = None
        for sid in {box.sandbox_id, rules_of or box.sandbox_id}:
            await self._guard.release(sid)
        self._pool.release(record.ip)
        for directory in {box.dir, self.config.sandboxes_dir / record.made_as}:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

    def _releaser(self, ip: str) -> Callable[[], Awaitable[None]]:
        async def release() -> None:
            self._pool.release(ip)

        return release

    def _remover(self, directory: Path) -> Callable[[], Awaitable[None]]:
        async def remove() -> None:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

        return remove

    def _container_remover(self, client: Any, name: str) -> Callable[[], Awaitable[None]]:
        async def remove() -> None:
            await asyncio.to_thread(containers.remove_container, client, name)

        return remove

    def _veth_remover(self, sandbox_id: str) -> Callable[[], Awaitable[None]]:
        async def remove() -> None:
            await asyncio.to_thread(self._network.detach_container, sandbox_id)

        return remove

    def _volume_remover(self, client: Any, name: str) -> Callable[[], Awaitable[None]]:
        async def remove() -> None:
            await asyncio.to_thread(containers.remove_volume, client, name)

        return remove

    def _forgetter(self, sandbox_id: str) -> Callable[[], Awaitable[None]]:
        async def forget() -> None:
            self._boxes.pop(sandbox_id, None)

        return forget

    # ------------------------------------------------------------------ saved images

    async def save_image(self, sandbox_id: str, image_id: str) -> SavedImage:
        """``docker commit`` of the sandbox's container as ``kiln-saved:<image_id>``:
        its files (the writable layer over its image; volumes and the agent's bind
        mounts are not in it), not its processes (``save_memory`` is false). A
        running container is paused while its layer is read."""
        ref = saved_ref(image_id)
        box = self._get(sandbox_id)
        if box.record.spec.volumes:
            raise InvalidState(
                f"sandbox {sandbox_id} has volumes attached: a volume cannot be in two"
                " sandboxes, so it cannot be saved"
            )
        client = await self._ensure_ready()
        async with box.lock:
            if box.destroyed:
                raise SandboxNotFound(f"sandbox {sandbox_id!r} was destroyed")
            with docker_errors(f"saving {sandbox_id} as {image_id}"):
                if await asyncio.to_thread(containers.image_exists, client, ref):
                    raise InvalidState(f"saved image {image_id!r} already exists")
                repo, tag = ref.split(":")
                spec = box.record.spec
                # What a create from it must match, kept on the image itself.
                shape = {"image": spec.image, "cpus": spec.cpus, "memory_mb": spec.memory_mb}
                await asyncio.to_thread(
                    client.api.commit,
                    box.record.container,
                    repository=repo,
                    tag=tag,
                    changes=[f"LABEL {SAVED_SHAPE_LABEL}={json.dumps(json.dumps(shape))}"],
                )
                attrs = await asyncio.to_thread(client.api.inspect_image, ref)
        return SavedImage(
            image_id=image_id,
            engine=ENGINE_NAME,
            image=spec.image,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            runtime=box.record.runtime,
            size_bytes=int(attrs.get("Size") or 0),
            memory=False,
            created_at=time.time(),
        )

    async def _saved_image(self, client: Any, spec: SandboxSpec) -> str:
        """The reference of ``spec.snapshot``, whose shape ``spec`` must have."""
        assert spec.snapshot is not None
        ref = saved_ref(spec.snapshot)
        with docker_errors(f"looking up saved image {spec.snapshot}"):
            if not await asyncio.to_thread(containers.image_exists, client, ref):
                raise ImageNotFound(f"no saved image {spec.snapshot!r} in the Docker engine")
            attrs = await asyncio.to_thread(client.api.inspect_image, ref)
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        try:
            shape = json.loads(labels[SAVED_SHAPE_LABEL])
        except (KeyError, TypeError, ValueError):
            raise EngineError(f"saved image {spec.snapshot!r} has no readable shape") from None
        if shape != {"image": spec.image, "cpus": spec.cpus, "memory_mb": spec.memory_mb}:
            raise InvalidSpec(
                "a sandbox made from a saved image has its image, vCPUs and memory"
                f" ({shape['image']!r}, {shape['cpus']}, {shape['memory_mb']} MB)"
            )
        return ref

    async def delete_saved_image(self, image_id: str) -> None:
        ref = saved_ref(image_id)
        if self._never_used():
            return
        client = await self._ensure_ready()
        with docker_errors(f"deleting saved image {image_id}"):
            if await asyncio.to_thread(containers.image_exists, client, ref):
                # Containers made from it keep its layers (force: the name goes even
                # while they use it; dockerd deletes the layers with the last of them).
                await asyncio.to_thread(client.api.remove_image, ref, force=True)

    # ------------------------------------------------------------------ volumes

    async def delete_volume(self, volume_id: str) -> None:
        if self._never_used():
            return
        client = await self._ensure_ready()
        await asyncio.to_thread(containers.remove_volume, client, volume_name(volume_id))

    # ------------------------------------------------------------------ recovery

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        box = self._get(sandbox_id)
        return {
            "sandbox_id": sandbox_id,
            "engine": ENGINE_NAME,
            "dir": str(box.dir),
            "runtime": box.record.runtime,
            "state": [box.state.status.value, box.state.thermal.value],
            STATE_KEY: None if box.last_boot is None else box.last_boot.to_json(),
        }

    async def adopt(self, state: Mapping[str, Any], *, hot: bool = True) -> SandboxInfo:
        """A container's files live in its node's dockerd: it cannot move, and stays
        its lost node's until that node returns."""
        raise InvalidState(
            f"sandbox {state.get('sandbox_id')!r} is a Docker container: its files are in"
            " its own node's dockerd, and it comes back only with that node"
        )

    async def release(self, sandbox_id: str) -> dict[str, Any]:
        raise InvalidState(
            f"sandbox {sandbox_id!r} is a Docker container: its files are in this node's"
            " dockerd, and it cannot move to another node"
        )

    async def import_state(self, state: Mapping[str, Any]) -> SandboxInfo:
        sandbox_id = state.get("sandbox_id")
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise InvalidState(f"Docker engine state without a sandbox_id: {state!r}")
        directory = self.config.sandboxes_dir / sandbox_id
        try:
            record = await asyncio.to_thread(Record.load, directory)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SandboxNotFound(f"no record of sandbox {sandbox_id}: {exc}") from exc
        client = await self._ensure_ready()
        found, pid = await asyncio.to_thread(containers.find, client, record.container)
        problem = None
        if found is Found.SNAPSHOT:
            # An exited container: its files, no processes. Stopped if the user stopped
            # it; otherwise it died under a running sandbox, which boots on next use.
            found = Found.SNAPSHOT if _was_stopped(state) else Found.DISK
        elif found is Found.NOTHING:
            found = Found.GONE
            problem = (
                f"its container {record.container} is gone, and the files in it with it"
                " (was dockerd's data directory lost?)"
            )
            log.error("sandbox %s cannot be recovered: %s", sandbox_id, problem)
        adopted = State(Status.STOPPED, Thermal.COLD) if found is Found.SNAPSHOT else ADOPTED[found]
        box = Box(
            record,
            directory,
            adopted,
            self._client_for(record),
            pid=pid,
            last_boot=LastBoot.from_json(state.get(STATE_KEY)),
            problem=problem,
        )
        self._boxes[sandbox_id] = box
        try:
            self._pool.mark_in_use(record.ip, sandbox_id)
        except NetworkError as exc:
            log.warning("sandbox %s: its address %s: %s", sandbox_id, record.ip, exc)
        try:
            await self._guard.admit(record.spec, record.ip)
        except EngineError as exc:
            log.error("sandbox %s: %s", sandbox_id, exc)
        if box.state.live:
            # A daemon that died between a start and its plumbing left the container
            # without eth0; one that did not finds the veth there and changes nothing.
            try:
                await self._plumb(box, client)
            except EngineError as exc:
                log.error("sandbox %s: %s", sandbox_id, exc)
        log.info("sandbox %s re-adopted (docker, %s): %s", sandbox_id, record.runtime, adopted)
        return self._info(box)

    async def cleanup_orphans(self) -> builtins.list[str]:
        """Remove containers and sandbox directories no known sandbox owns."""
        if self._never_used():
            return []
        client = await self._ensure_ready()
        boxes = [b for b in self._boxes.values() if not b.destroyed]
        # A sandbox from the pool is known by its member's id too (label, veth, config).
        known = {b.sandbox_id for b in boxes} | {b.record.made_as for b in boxes}
        known |= self._warm.known_ids()
        removed: builtins.list[str] = []
        for container_id, sid in await asyncio.to_thread(
            containers.own_containers, client, self.config
        ):
            if sid in known:
                continue
            await asyncio.to_thread(containers.remove_container, client, container_id)
            removed.append(f"container {container_name(sid) if sid else container_id}")
        for veth in await asyncio.to_thread(self._network.cleanup_orphan_veths, known):
            removed.append(f"veth {veth}")
        sandboxes = self.config.sandboxes_dir
        entries = sorted(sandboxes.iterdir()) if sandboxes.is_dir() else []
        for entry in entries:
            if entry.is_dir() and entry.name not in known:
                await asyncio.to_thread(shutil.rmtree, entry, ignore_errors=True)
                removed.append(f"sandbox dir {entry.name}")
        return removed

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Remove the warm pool's members; drop the dockerd connection (dockerd and the
        sandboxes' containers keep running)."""
        await self._warm.close()
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
        await asyncio.to_thread(self._network.close)

    async def shutdown(self) -> None:
        """:meth:`close`, then stop the private dockerd (its containers with it)."""
        await self.close()
        if self.config.start_dockerd:
            with docker_errors("stopping dockerd"):
                await asyncio.to_thread(self._dockerd.stop)


def saved_ref(image_id: str) -> str:
    """The Docker image reference of a saved image (its id is a Docker tag already)."""
    if not SANDBOX_ID_RE.match(image_id):
        raise InvalidSpec(f"invalid saved image id {image_id!r}")
    return f"{SAVED_REPOSITORY}:{image_id}"


def _was_stopped(state: Mapping[str, Any]) -> bool:
    """Whether the exported ``state`` is of a sandbox the user had stopped."""
    saved = state.get("state")
    return isinstance(saved, list | tuple) and bool(saved) and saved[0] == Status.STOPPED.value


def unavailable_reason() -> str | None:
    """Why the Docker engine cannot run here (None: it can)."""
    if shutil.which("dockerd") is None or shutil.which("containerd") is None:
        return (
            "dockerd is not installed (Debian: apt-get install docker.io; scripts/bootstrap does)"
        )
    return None


__all__ = ["CAPABILITIES", "ENGINE_NAME", "RUNTIMES", "DockerEngine", "DockerEngineConfig"]
