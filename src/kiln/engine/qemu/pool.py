"""The warm pool: per machine shape, sandboxes restored, configured and warmed up
ahead of time, paused until a create takes one.

A template restore still costs its create ~1 s under TCG, nearly all of it in
the guest: the restored machine runs with an empty translation cache, and the
agent configures network, user and files from the drive before it answers. A
pool *member* is a sandbox of its own (``pool-<hex>``: its own directory, disks,
address, TAP, MAC, token) made by that same path at low priority, in the
background, with nothing user-specific in it; then its first exec and a
CONFIGURE run once (translated now, in its own QEMU, whose translation cache it
keeps), and it is paused.

A create whose spec fits a pooled shape (no volumes, no own user, a config
small enough for one frame) takes a member (:meth:`Pool.claim`: a synchronous
pop, so two creates never get one member), and hands it over:

    firewall   the user's group and policy on the member's address and port, in
               one nftables update, started first and awaited before ``init`` runs
    QEMU       back to normal priority, ``cont``
    guest      one CONFIGURE frame: clock and a fresh RNG seed, hostname, env,
               files and a new token (no drive polling, no process started: the
               network is the member's; the guest answers before it writes the
               files, and holds later requests until it has); then ``init``, once
               the rules are in
    host       meanwhile, ``sandbox.json``, naming the member as ``net_id`` (the
               owner of its TAP and MAC), and a note that its config drive (what a
               boot from its disks reads) is due: the refill task writes that
               after the claim has settled (see :mod:`.late_drive`)

then the refill makes a new member. A create that finds no member takes the
ordinary path. Members are never reused: a claimed member becomes that
sandbox, destroyed with it, so nothing of one user's config can reach another's.

Members are in no listing, store or quota: the engine does not hold them, this
pool does; :meth:`Pool.close` destroys them, and after a crash the engine's
orphan cleanup removes them like any directory, process and TAP it does not
know. Refills run one at a time, their QEMU under ``nice``
(:data:`REFILL_NICE`), within :attr:`QemuConfig.pool_memory_mb` of guest memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final

from kiln.agent_client import AgentError

from ..base import SandboxSpec, guest_hostname
from ..boots import BootReason, LastBoot
from ..errors import EngineError
from . import disks, late_drive, machine, process, snapshot
from .config import QemuConfig
from .hostnet import HostNet
from .layout import Record
from .machine import VM, Phases

log = logging.getLogger(__name__)

#: Sandbox ids of pool members start with this.
MEMBER_PREFIX: Final = "pool-"
#: The niceness of a refill's QEMU (until its claim): it takes what sandboxes leave.
REFILL_NICE: Final = 19
#: Pause after a failed refill before the next try.
_RETRY_S: Final = 5.0
#: A refill starts this long after the last claim: the daemon's own share of a
#: refill (subprocesses, file copies) would otherwise run beside the new
#: sandbox's first requests.
SETTLE_S: Final = 1.0
#: A spec's user-specific config beyond this size takes the ordinary path (one
#: CONFIGURE frame carries it; frames end at 1 MiB).
MAX_CONFIG_BYTES: Final = 768 << 10
_SEED_BYTES: Final = 64
#: Written by a member's warm-up CONFIGURE, so that a claim's file writes run warm:
#: on the root file system (ext4), where a user's files go, not on a tmpfs.
_WARM_FILE: Final = "/var/lib/kiln/pool-warm"


@dataclass(frozen=True, slots=True)
class Shape:
    image: str
    cpus: int
    memory_mb: int

    @classmethod
    def of(cls, spec: SandboxSpec) -> Shape:
        return cls(spec.image, spec.cpus, spec.memory_mb)


class Pool:
    """The members of every pooled shape and the one task that refills them.

    ``make`` creates a sandbox the ordinary way (the provisioner's create);
    ``reserve`` checks a spec and holds its id while a claim hands a member over;
    ``write_drive`` writes a sandbox's config drive (what a reboot of it reads) to a
    new file.
    """

    def __init__(
        self,
        config: QemuConfig,
        net: HostNet,
        make: Callable[[SandboxSpec], Awaitable[VM]],
        reserve: Callable[[SandboxSpec], AbstractContextManager[None]],
        write_drive: late_drive.DriveWriter,
    ) -> None:
        self.config = config
        self._net = net
        self._make = make
        self._reserve = reserve
        self._write_drive = write_drive
        self._targets: dict[Shape, int] = {}
        self._members: dict[Shape, list[VM]] = {}
        self._filling: VM | None = None
        #: Claimed sandboxes whose config drive is still to be written.
        self._drives_due: list[VM] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_claim = 0.0
        #: Claims served from the pool / creates of a pooled shape that found it empty.
        self.claims = 0
        self.misses = 0

    # ------------------------------------------------------------------ what it holds

    def members(self) -> list[VM]:
        """Every live member (ready, or being made): not orphans, not sandboxes."""
        out = [vm for members in self._members.values() for vm in members]
        if self._filling is not None:
            out.append(self._filling)
        return out

    def ready(self, spec: SandboxSpec) -> int:
        """How many members of ``spec``'s shape wait to be claimed."""
        return len(self._members.get(Shape.of(spec), ()))

    def _memory_mb(self) -> int:
        return sum(vm.record.spec.memory_mb for vm in self.members())

    # ------------------------------------------------------------------ start, claim

    def start(self, spec: SandboxSpec) -> None:
        """Keep members of ``spec``'s shape from now on, as many as the config says
        (:meth:`QemuConfig.pool_size_for`; no-op at 0)."""
        size = self.config.pool_size_for(spec.image, spec.cpus, spec.memory_mb)
        if size <= 0 or self._closed:
            return
        self._targets.setdefault(Shape.of(spec), size)
        if self._task is None:
            self._task = asyncio.create_task(self._refill(), name="warm pool refill")
        self._wake.set()

    def fits(self, spec: SandboxSpec) -> bool:
        """Whether a member can become ``spec``'s sandbox (its shape is pooled and the
        rest of it is configurable in a running guest)."""
        return (
            Shape.of(spec) in self._targets
            and not spec.volumes
            and spec.user is None
            and spec.workdir is None
            and spec.engine in (None, machine.ENGINE_NAME)
            and _config_size(spec) <= MAX_CONFIG_BYTES
        )

    async def claim(self, spec: SandboxSpec) -> VM | None:
        """``spec``'s sandbox made from a member, hot and answering; None when no member
        fits or is ready, or the hand-over failed (the member is then destroyed): the
        caller creates it the ordinary way."""
        if not self.fits(spec):
            return None
        with self._reserve(spec):
            members = self._members.get(Shape.of(spec))
            if not members:
                self.misses += 1
                self._wake.set()
                return None
            vm = members.pop(0)  # no await since the check: one member, one create
            self._last_claim = time.monotonic()
            self._wake.set()
            try:
                await self._hand_over(vm, spec)
            except (EngineError, AgentError, OSError) as exc:
                log.warning(
                    "pool member %s could not become %s (%s); creating it anew",
                    vm.sandbox_id,
                    spec.sandbox_id,
                    exc,
                )
                await self._discard(vm, spec.sandbox_id)
                return None
            except BaseException:
                await self._discard(vm, spec.sandbox_id)
                raise
        self.claims += 1
        return vm

    async def _hand_over(self, vm: VM, spec: SandboxSpec) -> None:
        phases = Phases()
        net = self._net
        old = vm.record
        sid = spec.sandbox_id
        record = dataclasses.replace(
            old,
            spec=spec,
            token=secrets.token_hex(16),
            net_id=old.net_owner,
            created_at=time.time(),
        )
        # The user's rules replace the member's (its own group, the default policy)
        # while the guest takes its config; init, the first user code, waits for them.
        rules = asyncio.create_task(
            net.guard.transfer(old.spec.sandbox_id, spec, old.ip, old.tap, old.mac),
            name=f"pool rules {sid}",
        )
        tasks = [rules]
        try:
            net.hand_over_ip(old.ip, sid)
            if vm.pid is not None:
                process.set_nice(vm.pid, 0)
            await machine.qmp(vm, "cont")
            phases.mark("claim")
            # The host's files of the sandbox while the guest configures itself.
            tasks.append(asyncio.create_task(self._persist(vm, record), name=f"pool {sid}"))
            await vm.client.configure(_claim_config(record))
            phases.mark("configure")
            await rules
            phases.mark("rules")
            await tasks[1]
            phases.mark("files")
        except BaseException:
            for task in tasks:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            raise
        vm.record = record
        vm.client = machine.client_for(record, self.config)
        self._drives_due.append(vm)
        if spec.init:
            await vm.client.configure({"init": spec.init})
            phases.mark("init")
        vm.phases = phases.done()
        vm.last_boot = LastBoot.now(BootReason.CREATED)
        log.debug("sandbox %s from pool member %s: %s", sid, old.spec.sandbox_id, vm.phases)

    async def _persist(self, vm: VM, record: Record) -> None:
        """The sandbox's ``sandbox.json``, and the note that its config drive is due
        (the running QEMU keeps the member's, which the guest read at its boot)."""
        await asyncio.to_thread(late_drive.mark_due, vm.paths)
        await asyncio.to_thread(snapshot.write_json_atomic, vm.paths.record, record.to_json())

    async def _write_due_drives(self) -> None:
        """The config drives claims left to write, under nice, one after another."""
        nice = process.launch_nice.set(REFILL_NICE)  # this task's context only
        try:
            while self._drives_due:
                vm = self._drives_due.pop(0)
                try:
                    await late_drive.write_later(vm, self._write_drive)
                except (EngineError, OSError) as exc:
                    if not vm.destroyed:  # (a destroy removes the directory under it)
                        # The note stays on disk: its next boot writes the drive first.
                        log.warning("config drive of %s: %s", vm.sandbox_id, exc)
        finally:
            process.launch_nice.reset(nice)

    # ------------------------------------------------------------------ refill

    def _wanted(self) -> Shape | None:
        """The next shape to refill, if the memory budget allows one more member."""
        used = self._memory_mb()
        for shape, target in self._targets.items():
            short = len(self._members.get(shape, ())) < target
            if short and used + shape.memory_mb <= self.config.pool_memory_mb:
                return shape
        return None

    async def _refill(self) -> None:
        while not self._closed:
            shape = self._wanted()
            if shape is None and not self._drives_due:
                self._wake.clear()
                await self._wake.wait()
                continue
            settle = self._last_claim + SETTLE_S - time.monotonic()
            if settle > 0:
                await asyncio.sleep(settle)
                continue  # more claims may have come meanwhile
            if self._drives_due:
                await self._write_due_drives()
                continue
            if shape is None:
                continue
            try:
                vm = await self._fill(shape)
            except (EngineError, AgentError, OSError) as exc:
                log.warning("warm pool: making a %s member failed: %s", shape, exc)
                await asyncio.sleep(_RETRY_S)
                continue
            self._members.setdefault(shape, []).append(vm)

    async def _fill(self, shape: Shape) -> VM:
        """A new member: made like any sandbox (under nice), warmed up, paused."""
        mid = f"{MEMBER_PREFIX}{secrets.token_hex(6)}"
        spec = SandboxSpec(
            sandbox_id=mid,
            name=mid,
            cpus=shape.cpus,
            memory_mb=shape.memory_mb,
            image=shape.image,
            owner=mid,  # a firewall group of its own: it reaches no sandbox
        )
        nice = process.launch_nice.set(REFILL_NICE)
        try:
            vm = await self._make(spec)
        finally:
            process.launch_nice.reset(nice)
        self._filling = vm
        try:
            # What a claim and the first exec after it run, run once now: TCG
            # translates it here, and the member's QEMU keeps the translations.
            warm = _claim_config(vm.record)
            content = base64.b64encode(b"{}\n").decode()
            warm["files"] = [{"path": _WARM_FILE, "content": content, "mode": "0600"}]
            for _ in range(2):  # the exec's sync then flushes what the CONFIGURE wrote
                await vm.client.configure(warm)
                await vm.client.exec(["true"])
            await machine.qmp(vm, "stop")
        except BaseException:
            await self._discard(vm)
            raise
        finally:
            self._filling = None
        log.info("warm pool: member %s ready (%s)", mid, vm.phases)
        return vm

    # ------------------------------------------------------------------ teardown

    async def _discard(self, vm: VM, claimed_by: str | None = None) -> None:
        """Destroy a member (never a sandbox's): QEMU, rules, TAP, address, directory;
        and the rules a failed claim by ``claimed_by`` may have moved to that id."""
        if vm.destroyed:
            return
        vm.destroyed = True
        try:
            await machine.kill(vm)
        finally:
            for sid in {vm.record.spec.sandbox_id, claimed_by or vm.record.spec.sandbox_id}:
                await self._net.guard.release(sid)
            await self._net.delete_tap(vm.record.tap)
            await self._net.release_ip(vm.record.ip)
            await asyncio.to_thread(disks.remove_tree, vm.paths.root)

    async def close(self) -> None:
        """Stop refilling and destroy every member (they hold no one's data)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for vm in self.members():
            await self._discard(vm)
        self._members.clear()


def _config_size(spec: SandboxSpec) -> int:
    files = sum(len(f.content) for f in spec.files) * 4 // 3 + 64 * len(spec.files)
    env = sum(len(k) + len(v) for k, v in spec.env.items()) * 2
    return files + env + 2 * len(spec.init or "")


def _claim_config(record: Record) -> dict[str, Any]:
    """What a member is told at its claim: everything user-specific but ``init``."""
    config = record.spec.guest_config(record.token)
    config.pop("init", None)
    config.pop("sandbox_id", None)
    config["hostname"] = guest_hostname(record.spec.name)
    config["clock_ns"] = time.time_ns()
    config["seed"] = base64.b64encode(secrets.token_bytes(_SEED_BYTES)).decode()
    return config
