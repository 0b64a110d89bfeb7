"""The Docker engine: each sandbox a container whose PID 1 is kiln's guest agent.

The container runs the same image contents as a VM (kiln's rootfs, imported
once per base, :mod:`.images`) with the agent zipapp and its config
bind-mounted read-only, on a bridge of kiln's own with an address from kiln's
pool, so the host reaches the agent over TCP exactly as it reaches a VM's
(the same :class:`~kiln.agent_client.AgentClient`, the same egress rules).

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

The dockerd is kiln's private one (:class:`~.daemon.Dockerd`), started on first
use or adopted when it still runs; like QEMU processes, containers outlive a
daemon restart and are re-adopted (:meth:`DockerEngine.import_state`).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import docker.types
import requests.exceptions

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
from kiln.engine.base import Capabilities, SandboxInfo, SandboxSpec, guest_hostname
from kiln.engine.dial import agent_dialer
from kiln.engine.errors import (
    EngineError,
    EngineUnavailable,
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
from kiln.network import IPPool, Network, NetworkConfig, NetworkError

from . import images
from .config import DockerdConfig
from .daemon import Dockerd, probe, sdk_client
from .errors import DockerdError
from .host import is_zombie
from .record import (
    CONFIG_FILE,
    GUEST_AGENT,
    GUEST_CONFIG,
    LABEL,
    OWNER_LABEL,
    VOLUME_LABEL,
    Record,
    container_name,
    guest_config,
    volume_name,
    write_atomic,
)

log = logging.getLogger(__name__)

ENGINE_NAME = "docker"
RUNTIMES = ("runc", "runsc")
#: What each runtime can do (see the module docstring).
CAPABILITIES = {
    "runc": Capabilities(pause=True, snapshots=False),
    "runsc": Capabilities(pause=True, snapshots=False),
}
_BOOT_POLL = 0.01
_BOOT_CONNECT_TIMEOUT = 0.5
_STOP_TIMEOUT = 5  # seconds the agent gets to end its processes on a stop


@dataclass(frozen=True, slots=True)
class DockerEngineConfig:
    """``state_dir``   records, guest configs and agent zipapps (``STATE/sandboxes/<id>``)
    ``dockerd``       the private dockerd to start or adopt
    ``network``       kiln's bridge for containers (its own, not the VMs')
    ``runtime``       the default runtime
    ``image_dir``     kiln.images' cache (None: its default)
    ``start_dockerd`` False: use a dockerd already answering at ``dockerd.socket``
    """

    state_dir: Path
    dockerd: DockerdConfig
    network: NetworkConfig = field(
        default_factory=lambda: NetworkConfig(
            bridge="kilnd0", subnet="10.213.1.0/24", tap_prefix="kdtap"
        )
    )
    runtime: str = "runc"
    image_dir: Path | None = None
    start_dockerd: bool = True
    agent_timeout: float = 10.0
    boot_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def network_name(self) -> str:
        """The Docker network (a bridge network on kiln's own bridge) its sandboxes join."""
        return f"kiln-{self.network.bridge}"

    @property
    def owner(self) -> str:
        """Labels what this engine made, so another kiln sharing the dockerd keeps its own."""
        return hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:16]


@dataclass(eq=False)
class _Box:
    record: Record
    dir: Path
    state: State
    client: AgentClient
    pid: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    destroyed: bool = False

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES[self.record.runtime]


def pid_alive(pid: int | None) -> bool:
    return pid is not None and not is_zombie(pid)


class _Undo:
    """Steps that take back a half-done create, run last-in first-out."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def push(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        self._steps.append((what, step))

    async def run(self) -> None:
        for what, step in reversed(self._steps):
            try:
                await step()
            except Exception as exc:
                log.warning("undo %s: %s", what, exc)


@contextlib.contextmanager
def _docker_errors(what: str) -> Iterator[None]:
    """The Docker SDK's and the host's errors as EngineErrors, once, where the call is."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise SandboxCrashed(f"{what}: {_explain(exc)}") from exc
    except docker.errors.APIError as exc:
        raise EngineError(f"{what}: {_explain(exc)}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EngineUnavailable(f"{what}: dockerd does not answer: {exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise EngineError(f"{what}: {exc}") from exc


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)


class DockerEngine:
    """Sandboxes as containers of a private dockerd (an :class:`~kiln.engine.base.Engine`)."""

    name = ENGINE_NAME

    def __init__(self, config: DockerEngineConfig) -> None:
        self.config = config
        self._network = Network(config.network)
        self._pool = IPPool(config.network.subnet)
        self._dockerd = Dockerd(config.dockerd)
        self._client: Any = None
        self._runtimes: tuple[str, ...] = ()
        self._boxes: dict[str, _Box] = {}
        self._ready_lock = asyncio.Lock()
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._images: dict[str, str] = {}

    # ------------------------------------------------------------------ set-up

    @property
    def dockerd(self) -> Dockerd:
        return self._dockerd

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
        with _docker_errors(f"inspecting the container of {sandbox_id}"):
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
        with _docker_errors("setting up the Docker network"):
            self._ensure_network(client)
        log.info(
            "Docker engine ready: dockerd %s (%s), runtimes %s",
            info.version,
            how,
            ", ".join(self._runtimes),
        )
        return client

    def _ensure_network(self, client: Any) -> None:
        """A bridge network on kiln's bridge, so the addresses are kiln's pool's."""
        net = self.config.network
        subnet = str(self._pool.subnet)
        gateway = str(next(self._pool.subnet.hosts()))
        name = self.config.network_name
        for existing in client.networks.list(names=[name]):
            attrs = existing.attrs
            pools = (attrs.get("IPAM") or {}).get("Config") or []
            bridge = (attrs.get("Options") or {}).get("com.docker.network.bridge.name")
            if bridge == net.bridge and any(p.get("Subnet") == subnet for p in pools):
                return
            log.info("Docker network %s is for another bridge or subnet: re-creating", name)
            existing.remove()
        client.networks.create(
            name,
            driver="bridge",
            options={"com.docker.network.bridge.name": net.bridge},
            ipam=docker.types.IPAMConfig(
                pool_configs=[docker.types.IPAMPool(subnet=subnet, gateway=gateway)]
            ),
        )

    async def _image(self, tier: str) -> str:
        ref = self._images.get(tier)
        if ref is not None:
            return ref
        client = await self._ensure_ready()
        lock = self._image_locks.setdefault(tier, asyncio.Lock())
        async with lock:
            ref = self._images.get(tier)
            if ref is None:
                with _docker_errors(f"importing the {tier} image"):
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

    # ------------------------------------------------------------------ lookup, info

    def _get(self, sandbox_id: str) -> _Box:
        box = self._boxes.get(sandbox_id)
        if box is None or box.destroyed:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r} in the Docker engine")
        return box

    def _info(self, box: _Box) -> SandboxInfo:
        spec = box.record.spec
        return SandboxInfo(
            sandbox_id=spec.sandbox_id,
            name=spec.name,
            engine=ENGINE_NAME,
            image=spec.image,
            status=box.state.status,
            thermal=box.state.thermal,
            ip=box.record.ip,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            keep_hot=spec.keep_hot,
            # Without snapshots: whether it can come back (its files are kept).
            has_snapshot=box.state.thermal is Thermal.COLD,
            capabilities=box.capabilities,
            runtime=box.record.runtime,
        )

    def _plan(self, op: Op, box: _Box) -> Transition:
        return plan(op, box.state, box.sandbox_id, snapshots=box.capabilities.snapshots)

    def _notice_death(self, box: _Box) -> bool:
        """Mark a sandbox whose container's process vanished as crashed; True if it did."""
        if box.state.live and not pid_alive(box.pid):
            log.warning("container of sandbox %s (pid %s) is gone", box.sandbox_id, box.pid)
            box.pid = None
            box.state = self._plan(Op.CRASH, box).next
            return True
        return False

    def _observe(self, box: _Box) -> None:
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
            raise InvalidSpec(f"sandbox {spec.sandbox_id} exists already")
        return runtime

    async def prepare(self, spec: SandboxSpec) -> None:
        self._check_spec(spec)
        await self._image(spec.image)
        await asyncio.to_thread(images.agent_zipapp, self.config.state_dir)

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        runtime = self._check_spec(spec)
        client = await self._ensure_ready()
        if runtime not in self._runtimes:
            raise EngineUnavailable(
                f"runtime {runtime} is not available in kiln's dockerd (it has "
                f"{', '.join(self._runtimes) or 'none'}); install gVisor (apt-get install runsc)"
            )
        image = await self._image(spec.image)
        agent = await asyncio.to_thread(images.agent_zipapp, self.config.state_dir)
        sid = spec.sandbox_id
        undo = _Undo()
        try:
            try:
                ip = self._pool.allocate(sid)
            except NetworkError as exc:
                raise EngineError(f"no address for sandbox {sid}: {exc}") from exc
            undo.push("release the address", self._releaser(ip))
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
            )
            created = await asyncio.to_thread(self._make_volumes, client, spec)
            for volume in created:
                undo.push(f"remove volume {volume}", self._volume_remover(client, volume))
            record.created_volumes = tuple(created)
            await asyncio.to_thread(self._write_files, record, directory)
            with _docker_errors(f"creating the container of {sid}"):
                await asyncio.to_thread(self._create_container, client, record, directory)
            undo.push("remove the container", self._container_remover(client, record.container))
            box = _Box(record, directory, CREATED.next, self._client_for(record))
            self._boxes[sid] = box
            undo.push("forget the sandbox", self._forgetter(sid))
            async with box.lock:
                await self._boot(box, client)
        except BaseException:
            await asyncio.shield(undo.run())
            raise
        log.info("sandbox %s created (docker, %s) at %s", sid, runtime, record.ip)
        return self._info(box)

    def _make_volumes(self, client: Any, spec: SandboxSpec) -> builtins.list[str]:
        """Docker volumes for the spec's volumes that do not exist yet; their names."""
        made = []
        for vol in spec.volumes:
            name = volume_name(vol.name)
            with _docker_errors(f"volume {vol.name}"):
                try:
                    client.volumes.get(name)
                    continue
                except docker.errors.NotFound:
                    pass
                client.volumes.create(name, labels={VOLUME_LABEL: vol.name})
            made.append(name)
        return made

    def _write_files(self, record: Record, directory: Path) -> None:
        record.save(directory)
        write_atomic(directory / CONFIG_FILE, json.dumps(guest_config(record)), mode=0o644)

    def _create_container(self, client: Any, record: Record, directory: Path) -> None:
        spec = record.spec
        api = client.api
        mounts = [
            docker.types.Mount(GUEST_AGENT, record.agent, type="bind", read_only=True),
            docker.types.Mount(
                GUEST_CONFIG, str(directory / CONFIG_FILE), type="bind", read_only=True
            ),
            *(
                docker.types.Mount(v.mount, volume_name(v.name), type="volume")
                for v in spec.volumes
            ),
        ]
        dns = self._network.dns_servers()
        memory = f"{spec.memory_mb}m"
        host_config = api.create_host_config(
            runtime=record.runtime,
            nano_cpus=spec.cpus * 1_000_000_000,
            mem_limit=memory,
            memswap_limit=memory,  # no swap: memory_mb is what it gets, as in a VM
            mounts=mounts,
            dns=dns or None,
            log_config=docker.types.LogConfig(
                type="json-file", config={"max-size": "1m", "max-file": "1"}
            ),
        )
        endpoint = api.create_endpoint_config(ipv4_address=record.ip)
        api.create_container(
            image=record.image,
            command=["/usr/bin/python3", GUEST_AGENT, "--container", "--config", GUEST_CONFIG],
            name=record.container,
            hostname=guest_hostname(spec.name),
            labels={LABEL: record.sandbox_id, OWNER_LABEL: self.config.owner},
            host_config=host_config,
            networking_config=api.create_networking_config({self.config.network_name: endpoint}),
            stop_signal="SIGTERM",
        )

    # ------------------------------------------------------------------ boot, wait

    async def _boot(self, box: _Box, client: Any) -> None:
        """Start the container and wait for the agent; the caller holds the lock and
        applies the state."""
        name = box.record.container
        with _docker_errors(f"starting the container of {box.sandbox_id}"):
            await asyncio.to_thread(client.api.start, name)
            attrs = await asyncio.to_thread(client.api.inspect_container, name)
        box.pid = int(attrs["State"].get("Pid") or 0) or None
        await self._wait_agent(box, client, self.config.boot_timeout)

    async def _wait_agent(self, box: _Box, client: Any, timeout: float) -> None:  # noqa: ASYNC109
        probe = self._client_for(box.record, _BOOT_CONNECT_TIMEOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await probe.activity()
                return
            except (AgentConnectError, AgentConnectionLost, AgentTimeout) as exc:
                if not pid_alive(box.pid):
                    logs = await self._logs_tail(client, box)
                    raise SandboxCrashed(
                        f"sandbox {box.sandbox_id} exited while starting: {logs}"
                    ) from exc
                if time.monotonic() > deadline:
                    logs = await self._logs_tail(client, box)
                    raise SandboxCrashed(
                        f"the agent of {box.sandbox_id} did not answer within {timeout:.0f} s:"
                        f" {logs}"
                    ) from exc
            except AgentError as exc:
                raise EngineError(f"the agent of {box.sandbox_id} refused us: {exc}") from exc
            await asyncio.sleep(_BOOT_POLL)

    async def _logs_tail(self, client: Any, box: _Box, lines: int = 6) -> str:
        try:
            raw = await asyncio.to_thread(client.api.logs, box.record.container, tail=lines)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            return f"(no container output: {exc})"
        text = raw.decode(errors="replace").strip()
        return " | ".join(text.splitlines()[-lines:]) or "(no container output)"

    # ------------------------------------------------------------------ thermal

    async def pause(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.PAUSE)

    async def resume(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.RESUME)

    async def ensure_hot(self, sandbox_id: str) -> None:
        await self._transition(sandbox_id, Op.ENSURE_HOT)

    async def stop(self, sandbox_id: str) -> SandboxInfo:
        # Without snapshots there is no cold step, only the user's stop: its
        # processes end, its files stay.
        return self._info(await self._transition(sandbox_id, Op.STOP))

    async def start(self, sandbox_id: str) -> SandboxInfo:
        return self._info(await self._transition(sandbox_id, Op.START))

    async def agent(self, sandbox_id: str) -> AgentClient:
        box = await self._transition(sandbox_id, Op.ENSURE_HOT)
        return box.client

    async def _transition(self, sandbox_id: str, op: Op) -> _Box:
        box = self._get(sandbox_id)
        async with box.lock:
            if box.destroyed:
                raise SandboxNotFound(f"sandbox {sandbox_id!r} was destroyed")
            self._notice_death(box)
            step = self._plan(op, box)
            if step.action is not Action.NOTHING:
                client = await self._ensure_ready()
                await self._carry_out(box, client, step.action)
            box.state = step.next
        return box

    async def _carry_out(self, box: _Box, client: Any, action: Action) -> None:
        name = box.record.container
        what = f"{action} of sandbox {box.sandbox_id}"
        match action:
            case Action.PAUSE:
                with _docker_errors(what):
                    await asyncio.to_thread(client.api.pause, name)
            case Action.RESUME:
                with _docker_errors(what):
                    await asyncio.to_thread(client.api.unpause, name)
            case Action.SHUTDOWN:
                with _docker_errors(what):
                    await asyncio.to_thread(client.api.stop, name, timeout=_STOP_TIMEOUT)
                box.pid = None
            case Action.BOOT:
                await self._boot(box, client)
            case _:
                raise AssertionError(f"unplanned action {action}")

    # ------------------------------------------------------------------ destroy

    async def destroy(self, sandbox_id: str) -> None:
        box = self._boxes.get(sandbox_id)
        if box is None or box.destroyed:
            return
        async with box.lock:
            if self._boxes.get(sandbox_id) is not box:
                return  # destroyed while we waited for the lock
            client = await self._ensure_ready()
            await self._remove_container(client, box.record.container)
            box.destroyed = True
            box.pid = None
            self._pool.release(box.record.ip)
            await asyncio.to_thread(shutil.rmtree, box.dir, ignore_errors=True)
            self._boxes.pop(sandbox_id, None)
        log.info("sandbox %s destroyed (docker)", sandbox_id)

    async def _remove_container(self, client: Any, name: str) -> None:
        with _docker_errors(f"removing container {name}"):
            # Unpause first: a paused runsc sandbox can hang a forced remove. (Not
            # paused, or gone: an APIError.)
            with contextlib.suppress(docker.errors.APIError):
                await asyncio.to_thread(client.api.unpause, name)
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(client.api.remove_container, name, force=True)

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
            await self._remove_container(client, name)

        return remove

    def _volume_remover(self, client: Any, name: str) -> Callable[[], Awaitable[None]]:
        async def remove() -> None:
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(lambda: client.volumes.get(name).remove(force=True))

        return remove

    def _forgetter(self, sandbox_id: str) -> Callable[[], Awaitable[None]]:
        async def forget() -> None:
            self._boxes.pop(sandbox_id, None)

        return forget

    # ------------------------------------------------------------------ volumes

    async def delete_volume(self, volume_id: str) -> None:
        if self._never_used():
            return
        client = await self._ensure_ready()
        name = volume_name(volume_id)
        with _docker_errors(f"deleting volume {volume_id}"):
            try:
                volume = await asyncio.to_thread(client.volumes.get, name)
            except docker.errors.NotFound:
                return
            try:
                await asyncio.to_thread(volume.remove)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise InvalidState(f"volume {volume_id} is in use by a container") from exc
                raise

    # ------------------------------------------------------------------ recovery

    def export_state(self, sandbox_id: str) -> dict[str, Any]:
        box = self._get(sandbox_id)
        return {
            "sandbox_id": sandbox_id,
            "engine": ENGINE_NAME,
            "dir": str(box.dir),
            "runtime": box.record.runtime,
            "state": [box.state.status.value, box.state.thermal.value],
        }

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
        found, pid = await self._find(client, record)
        # An exited container (SNAPSHOT): its files, no processes -- stopped.
        adopted = State(Status.STOPPED, Thermal.COLD) if found is Found.SNAPSHOT else ADOPTED[found]
        box = _Box(record, directory, adopted, self._client_for(record), pid=pid)
        self._boxes[sandbox_id] = box
        try:
            self._pool.mark_in_use(record.ip, sandbox_id)
        except NetworkError as exc:
            log.warning("sandbox %s: its address %s: %s", sandbox_id, record.ip, exc)
        log.info("sandbox %s re-adopted (docker, %s): %s", sandbox_id, record.runtime, adopted)
        return self._info(box)

    async def _find(self, client: Any, record: Record) -> tuple[Found, int | None]:
        try:
            attrs = await asyncio.to_thread(client.api.inspect_container, record.container)
        except docker.errors.NotFound:
            return Found.NOTHING, None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineUnavailable(f"dockerd does not answer: {exc}") from exc
        st = attrs["State"]
        if st.get("Running"):
            return (Found.PAUSED if st.get("Paused") else Found.RUNNING), int(st["Pid"]) or None
        return Found.SNAPSHOT, None  # an exited container: its files, to boot again

    async def cleanup_orphans(self) -> builtins.list[str]:
        """Remove containers and sandbox directories no known sandbox owns."""
        if self._never_used():
            return []
        client = await self._ensure_ready()
        known = {sid for sid, box in self._boxes.items() if not box.destroyed}
        removed: builtins.list[str] = []
        with _docker_errors("listing containers"):
            containers = await asyncio.to_thread(
                client.api.containers,
                all=True,
                filters={"label": [LABEL, f"{OWNER_LABEL}={self.config.owner}"]},
            )
        for c in containers:
            sid = (c.get("Labels") or {}).get(LABEL, "")
            if sid in known:
                continue
            name = container_name(sid) if sid else c["Id"]
            await self._remove_container(client, c["Id"])
            removed.append(f"container {name}")
        sandboxes = self.config.sandboxes_dir
        entries = sorted(sandboxes.iterdir()) if sandboxes.is_dir() else []
        for entry in entries:
            if entry.is_dir() and entry.name not in known:
                await asyncio.to_thread(shutil.rmtree, entry, ignore_errors=True)
                removed.append(f"sandbox dir {entry.name}")
        return removed

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Drop the dockerd connection; dockerd and the containers keep running."""
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
        await asyncio.to_thread(self._network.close)

    async def shutdown(self) -> None:
        """:meth:`close`, then stop the private dockerd (its containers with it)."""
        await self.close()
        if self.config.start_dockerd:
            with _docker_errors("stopping dockerd"):
                await asyncio.to_thread(self._dockerd.stop)


def unavailable_reason() -> str | None:
    """Why the Docker engine cannot run here (None: it can)."""
    if shutil.which("dockerd") is None or shutil.which("containerd") is None:
        return (
            "dockerd is not installed (Debian: apt-get install docker.io; scripts/bootstrap does)"
        )
    return None


__all__ = ["CAPABILITIES", "ENGINE_NAME", "RUNTIMES", "DockerEngine", "DockerEngineConfig"]
