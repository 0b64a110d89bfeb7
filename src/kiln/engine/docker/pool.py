"""The Docker engine's warm pool: per shape, containers started and warmed up ahead of
time, paused until a create takes one.

An ordinary Docker create costs ~0.4 s: the container's create and start, its
eth0, and the agent's own start (Python's, most of it). A pool *member* is a
container made by that same path (:meth:`DockerEngine._make`, ``pool-<hex>``:
its own directory, address, veth, token, firewall group) with nothing
user-specific in it, at CPU weight :data:`LOW_CPU_SHARES` (a refill takes what
sandboxes leave); then a CONFIGURE and an exec run once (the agent imports what
a claim and a first exec use), and it is paused (``docker pause``: the freezer
cgroup; it uses no CPU, its memory stays).

A create whose spec fits a pooled shape (:meth:`WarmPool.fits`: runc, not from a
saved image, no volumes, no own user, a config that fits one frame) takes a member
(:meth:`WarmPool.claim`: a synchronous pop, so two creates never get one) and
hands it over:

    firewall   the user's group and policy on the member's address, in one nftables
               update, awaited before ``init`` runs
    docker     unpause; then, beside the CONFIGURE, the container renamed to the
               sandbox's (``docker rename``; dockerd serves one call per container
               at a time, so nothing else goes through it)
    guest      one CONFIGURE frame: files, env and a new token; then ``init``, once
               the rules are in
    host       beside all of it: the CPU weight back to normal in the container's
               cgroup (written directly; Docker's config keeps the member's until the
               container's next start, when the engine updates it), the host name
               (below), the sandbox's ``record.json`` and the guest's ``config.json``
               (what a restart of the container reads)

What Docker fixes at create and cannot change afterwards:

host name  Docker has no call for it, and ``sethostname`` in the container needs
           CAP_SYS_ADMIN, which a sandbox must not have (its root could mount, and
           Docker's seccomp profile would then let it make user namespaces). The
           engine sets it from outside instead (:mod:`.hostname`: runc, a host
           thread joins the container's UTS namespace; runsc, whose namespaces are
           gVisor's, a privileged ``docker exec`` of the host's static busybox,
           mounted read-only into members; ``/etc/hostname`` and ``/etc/hosts``
           rewritten in place), at the claim and after every later start of the
           container (Docker starts it under the member's name). ``docker inspect``
           still shows the member's name in ``Config.Hostname``.
labels     the container keeps the member's ``io.kiln.sandbox`` label; the record
           names the member (:attr:`~.record.Record.member`), so orphan cleanup
           and recovery know the container, its veth and its config directory
           (``STATE/sandboxes/<member>/``, the bind mount's source) by it.
name       ``docker rename``: the container is ``kiln-<sandbox id>`` like any.

Clock and RNG need nothing: a container has the host kernel's, so there is no
state of one user's that a member could carry to another.

A runsc member is on dockerd's network (its address fixed at create, like a runc
member's veth address): the claim keeps the address and moves the firewall group,
as for runc. runsc is pooled only where the host has a static busybox (Debian's
``busybox-static``, which ``scripts/bootstrap`` installs).

A create that finds no member, or whose hand-over fails (the member is then
removed), takes the ordinary path. Members are never reused: a claimed member
becomes that sandbox, destroyed with it. Members are in no listing, store or
quota: the engine's table does not hold them, this pool does; :meth:`WarmPool.close`
removes them, and after a crash the engine's orphan cleanup removes their
containers, veths and directories like any it does not know. Refills run one at
a time, :data:`SETTLE_S` after the last claim, within ``pool_memory_mb``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import docker.errors

from kiln.agent_client import AgentClient, AgentError
from kiln.engine.base import SandboxSpec, guest_hostname
from kiln.engine.boots import BootReason, LastBoot
from kiln.engine.errors import EngineError, InvalidState
from kiln.engine.states import CREATED
from kiln.network import IPPool

from ..guard import Guard
from . import containers, hostname
from .box import Box
from .config import DockerEngineConfig
from .containers import docker_errors
from .host import set_cpu_shares
from .record import Record, container_name

log = logging.getLogger(__name__)

#: Sandbox ids of pool members start with this.
MEMBER_PREFIX: Final = "pool-"
#: The runtimes whose sandboxes can come from the pool where the host can rename
#: their containers (:func:`.hostname.settable`; see the module docstring).
POOLED_RUNTIMES: Final = frozenset({"runc", "runsc"})
#: A member's CPU weight (cgroup ``cpu.shares``) until its claim; Docker's default,
#: which every sandbox has, is :data:`NORMAL_CPU_SHARES`.
LOW_CPU_SHARES: Final = 2
NORMAL_CPU_SHARES: Final = 1024
#: Pause after a failed refill before the next try.
#: A shape whose member could not be made is tried again this long after (the
#: others' refills go on meanwhile).
_RETRY_S: Final = 5.0
#: A refill starts this long after the last claim, so that its container's start
#: does not run beside the new sandbox's first requests.
SETTLE_S: Final = 1.0
#: A spec's user-specific config beyond this size takes the ordinary path (one
#: CONFIGURE frame carries it; frames end at 1 MiB).
MAX_CONFIG_BYTES: Final = 768 << 10


@dataclass(frozen=True, slots=True)
class Shape:
    image: str
    cpus: int
    memory_mb: int
    runtime: str


class WarmPool:
    """The members of every pooled shape and the one task that refills them.

    ``make`` creates and starts a member the ordinary way (not in the engine's
    table); ``remove`` removes a container with everything it holds; ``docker`` is
    the engine's dockerd client; ``write_files`` writes a sandbox's record and
    guest config.
    """

    def __init__(
        self,
        config: DockerEngineConfig,
        guard: Guard,
        addresses: IPPool,
        *,
        make: Callable[[SandboxSpec, str], Awaitable[Box]],
        docker: Callable[[], Awaitable[Any]],
        remove: Callable[[Box, Any, str | None], Awaitable[None]],
        client_for: Callable[[Record], AgentClient],
        write_files: Callable[[Record, Path], None],
    ) -> None:
        self.config = config
        self._guard = guard
        self._addresses = addresses
        self._make = make
        self._docker = docker
        self._remove = remove
        self._client_for = client_for
        self._write_files = write_files
        self._targets: dict[Shape, int] = {}
        self._members: dict[Shape, list[Box]] = {}
        self._filling: Box | None = None
        self._made: dict[str, _Made] = {}  # member id → its container, as made
        #: Ids whose containers and directories exist but are in no table yet: a member
        #: being made, a claim's member and sandbox during the hand-over.
        self._busy: set[str] = set()
        self._failed: dict[Shape, float] = {}  # when a shape's last refill failed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_claim = 0.0
        #: Claims served from the pool / creates of a pooled shape that found it empty.
        self.claims = 0
        self.misses = 0

    # ------------------------------------------------------------------ what it holds

    def members(self) -> list[Box]:
        """Every live member (ready, or being made): not orphans, not sandboxes."""
        out = [box for members in self._members.values() for box in members]
        if self._filling is not None:
            out.append(self._filling)
        return out

    def known_ids(self) -> set[str]:
        """The ids of everything the pool holds, also what is in the making (for the
        orphan cleanup: their containers, veths and directories are not orphans)."""
        return {box.sandbox_id for box in self.members()} | self._busy

    def ready(self, spec: SandboxSpec, runtime: str) -> int:
        """How many members of ``spec``'s shape wait to be claimed."""
        return len(self._members.get(_shape(spec, runtime), ()))

    def _memory_mb(self) -> int:
        return sum(box.record.spec.memory_mb for box in self.members())

    # ------------------------------------------------------------------ start, claim

    def start(self, spec: SandboxSpec, runtime: str) -> None:
        """Keep ``pool_size`` members of ``spec``'s shape from now on (no-op at size 0,
        and for a runtime that is not pooled)."""
        if self.config.pool_size <= 0 or self._closed or not pooled(runtime):
            return
        if spec.snapshot is not None:
            return  # a saved image is its own image: no member was made from it
        self._targets.setdefault(_shape(spec, runtime), self.config.pool_size)
        if self._task is None:
            self._task = asyncio.create_task(self._refill(), name="docker warm pool refill")
        self._wake.set()

    def fits(self, spec: SandboxSpec, runtime: str) -> bool:
        """Whether a member can become ``spec``'s sandbox (its shape is pooled and the
        rest of it is configurable in a running container)."""
        return (
            _shape(spec, runtime) in self._targets
            and spec.snapshot is None
            and not spec.volumes
            and spec.user is None
            and spec.workdir is None
            and _config_size(spec) <= MAX_CONFIG_BYTES
        )

    async def claim(self, spec: SandboxSpec, runtime: str) -> Box | None:
        """``spec``'s sandbox made from a member, running and answering; None when no
        member fits or is ready, or the hand-over failed (the member is then
        removed): the caller creates it the ordinary way."""
        if not self.fits(spec, runtime):
            return None
        members = self._members.get(_shape(spec, runtime))
        if not members:
            self.misses += 1
            self._wake.set()
            return None
        directory = self.config.sandboxes_dir / spec.sandbox_id
        try:
            # Made before the pop: a second create of this id fails here, as the
            # ordinary path's does, and takes no member.
            directory.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise InvalidState(f"sandbox {spec.sandbox_id!r} already exists") from None
        box = members.pop(0)  # no await since the check: one member, one create
        self._last_claim = time.monotonic()
        self._wake.set()
        busy = {box.sandbox_id, spec.sandbox_id}
        self._busy |= busy
        try:
            sandbox = await self._hand_over(box, spec, directory)
        except (EngineError, AgentError, OSError) as exc:
            log.warning(
                "pool member %s could not become %s (%s); creating it anew",
                box.sandbox_id,
                spec.sandbox_id,
                exc,
            )
            await self._discard(box, spec.sandbox_id)
            return None
        except BaseException:
            await self._discard(box, spec.sandbox_id)
            raise
        finally:
            # The engine puts the sandbox in its table before it awaits anything.
            self._busy -= busy
        self.claims += 1
        return sandbox

    async def _hand_over(self, box: Box, spec: SandboxSpec, directory: Path) -> Box:
        old = box.record
        sid = spec.sandbox_id
        made = self._made.pop(old.sandbox_id)
        record = dataclasses.replace(
            old,
            spec=spec,
            token=secrets.token_hex(16),
            created_at=time.time(),
            member=old.sandbox_id,
        )
        client = await self._docker()
        pid = box.pid
        if pid is None:
            raise EngineError(f"pool member {old.sandbox_id} has no process")
        names = guest_hostname(old.spec.name), guest_hostname(spec.name)

        def run(what: str, work: Callable[[], object]) -> asyncio.Task[None]:
            async def step() -> None:
                with docker_errors(f"{what} (pool member {old.sandbox_id} becoming {sid})"):
                    await asyncio.to_thread(work)

            return asyncio.create_task(step(), name=f"pool {what} {sid}")

        # The host's steps run beside the unpause and the CONFIGURE; dockerd does one
        # call at a time per container, so its rename waits for the unpause and then
        # runs beside the CONFIGURE (by container id: nothing waits for the new name).
        tasks = [
            # The user's rules replace the member's; init, the first user code, waits.
            asyncio.create_task(
                self._guard.transfer(old.sandbox_id, spec, old.ip, None, None),
                name=f"pool rules {sid}",
            ),
            # The cgroup's weight, directly: a docker update would queue behind the
            # others (the engine fixes Docker's record of it at the next start).
            run("restoring the CPU weight", lambda: set_cpu_shares(pid, NORMAL_CPU_SHARES)),
            run("writing its files", lambda: self._write_files(record, directory)),
        ]

        def rename_host() -> None:
            hostname.rename(record.runtime, client, made.attrs, pid, old=names[0], new=names[1])

        if record.runtime == "runc":
            tasks.append(run("setting the host name", rename_host))
        try:
            self._addresses.release(old.ip)
            self._addresses.mark_in_use(old.ip, sid)
            with docker_errors(f"unpausing pool member {old.sandbox_id}"):
                await asyncio.to_thread(containers.pause, client, made.id, resume=True)
            if record.runtime != "runc":
                # An exec in the container: it runs once it is unpaused.
                tasks.append(run("setting the host name", rename_host))
            tasks.append(run("renaming", lambda: client.api.rename(made.id, record.container)))
            await box.client.configure(_claim_config(record))
            for task in tasks:
                await task
        except BaseException:
            for task in tasks:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            raise
        sandbox = Box(record, directory, CREATED.next, self._client_for(record), pid=pid)
        if spec.init:
            await sandbox.client.configure({"init": spec.init})
        sandbox.last_boot = LastBoot.now(BootReason.CREATED)
        return sandbox

    # ------------------------------------------------------------------ refill

    def _wanted(self) -> tuple[Shape | None, float | None]:
        """The next shape to refill, if the memory budget allows one more member; else
        None and, if a shape waits out a failure, how long until it may be tried."""
        used = self._memory_mb()
        now = time.monotonic()
        wait: float | None = None
        for shape, target in self._targets.items():
            short = len(self._members.get(shape, ())) < target
            if short and used + shape.memory_mb <= self.config.pool_memory_mb:
                retry = self._failed.get(shape, 0.0) + _RETRY_S - now
                if retry <= 0:
                    return shape, None
                wait = retry if wait is None else min(wait, retry)
        return None, wait

    async def _refill(self) -> None:
        while not self._closed:
            shape, wait = self._wanted()
            if shape is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            settle = self._last_claim + SETTLE_S - time.monotonic()
            if settle > 0:
                await asyncio.sleep(settle)
                continue  # more claims may have come meanwhile
            try:
                box = await self._fill(shape)
            except (EngineError, AgentError, OSError) as exc:
                log.warning("docker warm pool: making a %s member failed: %s", shape, exc)
                self._failed[shape] = time.monotonic()
                continue
            self._failed.pop(shape, None)
            self._members.setdefault(shape, []).append(box)

    async def _fill(self, shape: Shape) -> Box:
        """A new member: made like any sandbox (at low CPU weight), warmed up, paused."""
        mid = f"{MEMBER_PREFIX}{secrets.token_hex(6)}"
        spec = SandboxSpec(
            sandbox_id=mid,
            name=mid,
            cpus=shape.cpus,
            memory_mb=shape.memory_mb,
            image=shape.image,
            owner=mid,  # a firewall group of its own: it reaches no sandbox
            engine="docker",
            runtime=shape.runtime,
        )
        self._busy.add(mid)
        try:
            box = await self._make(spec, shape.runtime)
        finally:
            self._busy.discard(mid)
        self._filling = box
        try:
            # What a claim and the first exec after it run, once now: the agent
            # imports the code of both while no one waits.
            await box.client.configure(_claim_config(box.record))
            await box.client.exec(["true"])
            client = await self._docker()
            with docker_errors(f"pausing pool member {mid}"):
                attrs = await asyncio.to_thread(client.api.inspect_container, box.record.container)
                await asyncio.to_thread(containers.pause, client, box.record.container)
            self._made[mid] = _Made(attrs["Id"], attrs)
        except BaseException:
            await self._discard(box)
            raise
        finally:
            self._filling = None
        log.info("docker warm pool: member %s ready", mid)
        return box

    # ------------------------------------------------------------------ teardown

    async def _discard(self, box: Box, claimed_by: str | None = None) -> None:
        """Remove a member (never a sandbox): its container, veth, rules, address and
        directory; and what a failed claim by ``claimed_by`` made under that id."""
        self._made.pop(box.sandbox_id, None)
        if box.destroyed:
            return
        try:
            client = await self._docker()
            if claimed_by is not None:
                # The rename may have happened before the claim failed.
                with contextlib.suppress(EngineError):
                    await asyncio.to_thread(
                        containers.remove_container, client, container_name(claimed_by)
                    )
            await self._remove(box, client, claimed_by)
        finally:
            if claimed_by is not None:
                directory = self.config.sandboxes_dir / claimed_by
                await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

    async def close(self) -> None:
        """Stop refilling and remove every member (they hold no one's data)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for box in self.members():
            with contextlib.suppress(EngineError, docker.errors.DockerException):
                await self._discard(box)
        self._members.clear()


@dataclass(frozen=True, slots=True)
class _Made:
    """A member's container as inspected when it was made: its id (what a claim's
    Docker calls name, as its name changes under them) and where its
    ``/etc/hostname`` and ``/etc/hosts`` are."""

    id: str
    attrs: dict[str, Any]


def pooled(runtime: str) -> bool:
    """Whether sandboxes of ``runtime`` can come from the pool on this host."""
    return runtime in POOLED_RUNTIMES and hostname.settable(runtime)


def _shape(spec: SandboxSpec, runtime: str) -> Shape:
    return Shape(spec.image, spec.cpus, spec.memory_mb, runtime)


def _config_size(spec: SandboxSpec) -> int:
    files = sum(len(f.content) for f in spec.files) * 4 // 3 + 64 * len(spec.files)
    env = sum(len(k) + len(v) for k, v in spec.env.items()) * 2
    return files + env + 2 * len(spec.init or "")


def _claim_config(record: Record) -> dict[str, Any]:
    """What a member is told at its claim: the user's files, env and a new token (the
    host name is the engine's to set, the clock and RNG the host kernel's)."""
    config = record.spec.guest_config(record.token)
    config.pop("init", None)
    config.pop("sandbox_id", None)
    return config
