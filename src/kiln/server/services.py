"""The business logic behind the routes, apart from HTTP.

:class:`Services` bundles what the daemon runs on (store, engine, config,
thermal manager, image builder) and the per-concept services the routes call:

- :class:`SandboxService`: name → id resolution, quotas, templates, secrets →
  env, volumes, the engine calls with their store updates, and
  :meth:`SandboxService.agent`, which every route that touches a sandbox goes
  through: it makes the sandbox hot and records host-side activity.
- :class:`TemplateService`, :class:`SecretService`, :class:`VolumeService`.

Everything here raises store, engine, agent or :mod:`.errors` exceptions;
:func:`kiln.server.errors.to_api_error` maps them to statuses. Listing and
reading sandboxes never wakes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets as _secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kiln.agent_client import AgentClient, AgentError
from kiln.api.requests import (
    NAME_RE,
    CreateSandbox,
    CreateTemplate,
    CreateVolume,
    ForkSandbox,
    NetworkBody,
    PatchSandbox,
    PutSecret,
)
from kiln.cluster import ClusterNode
from kiln.cluster.takeover import Takeover
from kiln.config import Config
from kiln.engine.base import Engine, SandboxSpec, VolumeSpec
from kiln.engine.boots import STATE_KEY, LastBoot
from kiln.engine.errors import EngineError, SandboxCrashed, SandboxNotFound
from kiln.engine.ports import listening_ports
from kiln.engine.router import Engines
from kiln.engine.states import (
    CREATED,
    Action,
    Op,
    State,
    Transition,
    lookup,
    observed,
    plan,
)
from kiln.faults import crash_point
from kiln.network.errors import NetworkError
from kiln.network.policy import NetworkPolicy
from kiln.store import (
    NewVolume,
    NotFound,
    OnExpire,
    SandboxConfig,
    SecretInfo,
    Store,
    StoreError,
    TemplateSpec,
    User,
    VolumeMount,
    check_labels,
    rfc3339,
)
from kiln.store import Sandbox as SandboxRow
from kiln.store import Template as TemplateRow
from kiln.store import Volume as VolumeRow

from .e2b.tokens import EnvdTokens
from .errors import ConflictError, NotFoundError, Unprocessable
from .expiry import Destroy, Disarm, ExpiryAction, Stop, action_for, is_due
from .images import ImageService
from .intents import INTENTS_DIR, Intent, Intents
from .publishing import Origin, PublishService
from .saved_images import SavedImageService

log = logging.getLogger("kiln.server")

#: The key the E2B API's envd access tokens derive from, in the data directory.
ENVD_KEY_FILE = "e2b-envd.key"

#: Host-side activity is written to the store at most this often per sandbox
#: (the thermal manager has the exact time in memory).
TOUCH_PERSIST_S = 5.0


class ThermalHook(Protocol):
    """What the services need from :class:`kiln.thermal.ThermalManager`."""

    def touch(self, sandbox_id: str, when: float | None = None) -> None: ...


#: Make sure an image tier is built (may take minutes the first time).
ImageEnsurer = Callable[[str], Awaitable[None]]


@dataclass
class Services:
    """Everything the HTTP layer runs on. Cheap to build; does no I/O."""

    store: Store
    engine: Engine
    config: Config
    engine_name: str = ""
    thermal: ThermalHook | None = None
    images: ImageEnsurer | None = None
    clock: Callable[[], float] = time.time
    #: This daemon as a node of a cluster (a PostgreSQL store); None: a single daemon.
    cluster: ClusterNode | None = None
    #: Taking over a lost node's sandboxes, adopting ones a drain moved here (a
    #: cluster with a shared directory); None: sandboxes never move.
    takeover: Takeover | None = None
    started: float = field(default_factory=time.monotonic)
    sandboxes: SandboxService = field(init=False)
    templates: TemplateService = field(init=False)
    secrets: SecretService = field(init=False)
    volumes: VolumeService = field(init=False)
    publishing: PublishService = field(init=False)
    saved_images: SavedImageService = field(init=False)
    catalog: ImageService = field(init=False)
    _envd_tokens: EnvdTokens | None = field(default=None, init=False, repr=False)
    _cluster_envd_tokens: EnvdTokens | None = field(default=None, init=False, repr=False)

    @property
    def envd_tokens(self) -> EnvdTokens:
        """The E2B API's per-sandbox envd access tokens (``.issue(id)``, ``.verify(id,
        token)``): on a node of a cluster from a key derived from the cluster secret
        (the same on every node), else from the key in ``<data_dir>/e2b-envd.key``
        (made on first use; the daemon loads it at start)."""
        if self.cluster is not None:
            if self._cluster_envd_tokens is None:
                secret = self.cluster.peer.secret
                self._cluster_envd_tokens = EnvdTokens.from_cluster_secret(secret)
            return self._cluster_envd_tokens
        if self._envd_tokens is None:
            self._envd_tokens = EnvdTokens.load(self.config.data_dir / ENVD_KEY_FILE)
        return self._envd_tokens

    def __post_init__(self) -> None:
        if not self.engine_name:
            self.engine_name = getattr(self.engine, "name", "") or "unknown"
        self.sandboxes = SandboxService(self)
        self.templates = TemplateService(self)
        self.secrets = SecretService(self)
        self.volumes = VolumeService(self)
        self.publishing = PublishService(self)
        self.saved_images = SavedImageService(self)
        self.catalog = ImageService(self)

    def health(self) -> dict[str, Any]:
        engines = self.engine.available() if isinstance(self.engine, Engines) else {}
        return {
            "status": "ok",
            "sandboxes": self.store.count_sandboxes(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "engine": self.engine_name,
            # Each engine: "ok", or why it cannot run here.
            "engines": {name: reason or "ok" for name, reason in engines.items()},
        }


def persist_engine_state(
    store: Store, engine: Engine, sandbox_id: str, **changes: Any
) -> SandboxRow:
    """Update a sandbox row with ``changes`` and the engine's current state (the stored
    state is kept if the engine cannot export one)."""
    try:
        state: dict[str, Any] | None = engine.export_state(sandbox_id)
    except EngineError as exc:
        log.warning("sandbox %s: cannot export engine state: %s", sandbox_id, exc)
        state = None
    if state is None:
        return store.update_sandbox(sandbox_id, **changes)
    return store.update_sandbox(sandbox_id, engine_state=state, **changes)


def new_sandbox_id() -> str:
    return f"sb-{_secrets.token_hex(6)}"


def check_ref(ref: str, what: str) -> str:
    """A path segment naming a sandbox/template/volume: anything else is unknown (404)."""
    if not NAME_RE.match(ref):
        raise NotFoundError(f"{what} {ref!r} not found")
    return ref


# ------------------------------------------------------------------------ sandboxes


class SandboxService:
    def __init__(self, services: Services) -> None:
        self._s = services
        self._locks: dict[str, asyncio.Lock] = {}
        self._creating: set[str] = set()
        self._active: dict[str, float] = {}
        self._persisted: dict[str, float] = {}
        self._reset_hooks: list[Callable[[str], Awaitable[None]]] = []
        self.intents = Intents(services.config.data_dir / INTENTS_DIR)

    # --- helpers ----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self._s.store

    @property
    def node(self) -> str | None:
        """This daemon's node name in a cluster (None: a single daemon)."""
        cluster = self._s.cluster
        return None if cluster is None else cluster.name

    @property
    def engine(self) -> Engine:
        return self._s.engine

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        """Held while an engine call changes the sandbox (or copies it)."""
        return self._lock(sandbox_id)

    def created(self, sb: SandboxRow) -> None:
        """409 while the sandbox is still being created."""
        self._created(sb)

    def persist_engine_state(self, sandbox_id: str, **changes: Any) -> SandboxRow:
        """The engine's view of the sandbox, written to its row."""
        return self._persist_engine_state(sandbox_id, **changes)

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        lock = self._locks.get(sandbox_id)
        if lock is None:
            lock = self._locks[sandbox_id] = asyncio.Lock()
        return lock

    def _forget(self, sandbox_id: str) -> None:
        self._locks.pop(sandbox_id, None)
        self._active.pop(sandbox_id, None)
        self._persisted.pop(sandbox_id, None)

    @property
    def creating(self) -> frozenset[str]:
        """Ids of the sandboxes whose create is in progress."""
        return frozenset(self._creating)

    def find(self, user: User, ref: str) -> SandboxRow:
        """The user's live sandbox with id or name ``ref`` (404 otherwise, also for others')."""
        return self.store.find_sandbox(user.id, check_ref(ref, "sandbox"))

    def touch(self, sandbox_id: str) -> None:
        """Record host-side activity: thermal manager now, the store now and then."""
        now = self._s.clock()
        self._active[sandbox_id] = now
        if self._s.thermal is not None:
            self._s.thermal.touch(sandbox_id, now)
        if now - self._persisted.get(sandbox_id, 0.0) >= TOUCH_PERSIST_S:
            self._persisted[sandbox_id] = now
            try:
                self.store.touch(sandbox_id, now)
            except NotFound:
                pass
            except StoreError as exc:
                # Activity is advisory: a full disk must not fail the call using the sandbox.
                log.warning("could not record the activity of %s: %s", sandbox_id, exc)

    def _persist_engine_state(self, sandbox_id: str, **changes: Any) -> SandboxRow:
        return persist_engine_state(self.store, self.engine, sandbox_id, **changes)

    # --- views ------------------------------------------------------------------------

    def _state(self, sb: SandboxRow) -> State:
        """The sandbox's state now: the stored one, updated by what the engine sees."""
        try:
            info = self.engine.info(sb.id)
        except EngineError:
            return _stored(sb)
        return observed(_stored(sb), info.state)

    def _snapshots(self, sb: SandboxRow) -> bool:
        """Whether its engine can snapshot it (else a stop keeps files, not processes)."""
        try:
            return self.engine.info(sb.id).capabilities.snapshots
        except EngineError:
            return True

    def _plan(self, op: Op, sb: SandboxRow) -> Transition:
        """``op``'s transition from the sandbox's state now; raises if it is not allowed."""
        try:
            return plan(op, self._state(sb), sb.name, snapshots=self._snapshots(sb))
        except SandboxCrashed as exc:
            problem = self._problem(sb)
            if problem is None:
                raise
            raise SandboxCrashed(
                f"sandbox {sb.name} is in error: {problem}; it can only be deleted"
            ) from exc

    def _problem(self, sb: SandboxRow) -> str | None:
        try:
            return self.engine.info(sb.id).problem
        except EngineError:
            return None

    def view(self, sb: SandboxRow) -> dict[str, Any]:
        """The API's sandbox object. Reads the engine's live state; never wakes anything."""
        state, ip = _stored(sb), sb.ip
        runtime, capabilities = sb.config.runtime, None
        last_boot = LastBoot.from_json((sb.engine_state or {}).get(STATE_KEY))
        lock = self._locks.get(sb.id)
        # Mid-transition (create, stop, start, wake) the engine's answer is in flux;
        # the stored state is what the API reports until the transition is done.
        if sb.id not in self._creating and not (lock is not None and lock.locked()):
            try:
                info = self.engine.info(sb.id)
            except EngineError:
                pass
            else:
                state = observed(state, info.state)
                ip = info.ip or ip
                runtime = info.runtime or runtime
                capabilities = {
                    "pause": info.capabilities.pause,
                    "snapshots": info.capabilities.snapshots,
                    "fork": info.capabilities.fork,
                }
                last_boot = info.last_boot or last_boot
        last = sb.last_active_at
        active = self._active.get(sb.id)
        if active is not None and active > last:
            last = active
        return {
            "id": sb.id,
            "name": sb.name,
            "status": str(state.status),
            "thermal": str(state.thermal),
            "ip": ip,
            "cpus": sb.cpus,
            "memory_mb": sb.memory_mb,
            "keep_hot": sb.keep_hot,
            "engine": sb.engine,
            "runtime": runtime,
            # What its engine can do: without snapshots a stop keeps files, not processes.
            "capabilities": capabilities,
            "image": sb.image,
            "created_at": rfc3339(sb.created_at),
            "last_active_at": rfc3339(last),
            "labels": dict(sb.labels),
            # What it may reach outside kiln (the daemon's default unless it was given one).
            "network": self._network_view(sb),
            "expires_at": None if sb.expires_at is None else rfc3339(sb.expires_at),
            "on_expire": str(sb.on_expire),
            # The node it lives on (None on a single daemon).
            "node": sb.node,
            # How its machine came up last: a "rebooted" one lost its processes.
            "last_boot": None
            if last_boot is None
            else {"reason": str(last_boot.reason), "at": rfc3339(last_boot.at)},
        }

    def list_for(self, user: User, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return [self.view(sb) for sb in self.store.list_sandboxes(user.id, labels=labels)]

    def _expires_at(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None else self._s.clock() + ttl_s

    def get(self, user: User, ref: str) -> dict[str, Any]:
        return self.view(self.find(user, ref))

    # --- create -----------------------------------------------------------------------

    async def create(self, user: User, body: CreateSandbox) -> dict[str, Any]:
        return self.view(await self.create_row(user, body))

    def shape_of(self, user: User, body: CreateSandbox) -> tuple[str, str | None, int, int]:
        """The engine, runtime, CPUs and memory a create would give its sandbox (what
        placement weighs), resolved as :meth:`create_row` does (404/422 as it would)."""
        s = self._s
        if body.saved_image is None and body.image and s.catalog.saved(user, body.image):
            body = body.model_copy(update={"saved_image": body.image, "image": None})
        saved = s.saved_images.for_create(user, body)
        if saved is not None:
            return saved.engine, saved.config.runtime, saved.cpus, saved.memory_mb
        tspec = s.templates.find(user, body.template_id).spec if body.template_id else None
        cpus = body.cpus if body.cpus is not None else (tspec.cpus if tspec else 1)
        memory_mb = (
            body.memory_mb if body.memory_mb is not None else (tspec.memory_mb if tspec else 512)
        )
        return body.engine or s.engine_name, body.runtime, cpus, memory_mb

    async def create_row(
        self,
        user: User,
        body: CreateSandbox,
        *,
        guest_user: str | None = None,
        template_name: str | None = None,
        idempotency: Mapping[str, str] | None = None,
    ) -> SandboxRow:
        """Create and boot a sandbox; its row. ``guest_user``: the guest's default user
        when not the image's (created at boot: the E2B API's ``user``);
        ``template_name``: the template as the client named it, when not a kiln
        template (an E2B ``templateID``); ``idempotency``: the key a retried create
        finds it by. The last two are recorded in its config."""
        s = self._s
        if body.saved_image is None and body.image and s.catalog.saved(user, body.image):
            # ``image`` names every image the caller has, their saved sandboxes too.
            body = body.model_copy(update={"saved_image": body.image, "image": None})
        saved = s.saved_images.for_create(user, body)
        tspec = s.templates.find(user, body.template_id).spec if body.template_id else None
        cpus = body.cpus if body.cpus is not None else (tspec.cpus if tspec else 1)
        memory_mb = (
            body.memory_mb if body.memory_mb is not None else (tspec.memory_mb if tspec else 512)
        )
        image, env, image_user, workdir = s.catalog.resolve(
            user, body.image or (tspec.image if tspec and tspec.image else s.config.image)
        )
        if guest_user is None:  # a Dockerfile image's USER, unless the caller's (E2B's)
            guest_user = image_user
        init = body.init if body.init is not None else (tspec.init if tspec else None)
        # The image's environment, under the template's, under the request's own.
        env.update(tspec.env if tspec else {})
        env.update(body.env or {})
        secret_names = tuple(dict.fromkeys(body.secrets or ()))
        labels = check_labels(body.labels or {})
        runtime: str | None = body.runtime
        if saved is not None:
            # Its memory already holds the saved sandbox's env and processes: a sandbox
            # made from it is that sandbox's shape, engine and config.
            cpus, memory_mb, image = saved.cpus, saved.memory_mb, saved.tier
            init, env, secret_names = (
                saved.config.init,
                dict(saved.config.env),
                saved.config.secrets,
            )
            runtime, guest_user = saved.config.runtime, saved.config.user
            workdir = saved.config.workdir

        if body.volumes is not None:
            mounts = [VolumeMount(v.name, v.mount) for v in body.volumes]
        else:
            mounts = list(tspec.volumes) if tspec else []
        new_volumes = body.new_volumes or []
        mounts += [VolumeMount(v.name, v.mount) for v in new_volumes]
        _check_mounts(mounts)

        network = _network_policy(body.network)
        if saved is not None and body.network is None and saved.config.network is not None:
            with contextlib.suppress(NetworkError):
                network = NetworkPolicy.from_json(saved.config.network)
        engine = saved.engine if saved is not None else body.engine or s.engine_name
        if body.runtime is not None and engine != "docker":
            raise Unprocessable(
                f"runtime: only the docker engine has runtimes (this sandbox's engine is {engine})"
            )
        # Cheap checks first, so nobody waits for an image build to hear "no".
        self.store.check_quota(user, cpus, memory_mb)
        name = body.name
        if name is not None and _exists(lambda: self.store.find_sandbox(user.id, name)):
            raise ConflictError(f"a sandbox named {name!r} already exists")
        new_names = {v.name for v in new_volumes}
        for m in mounts:
            if m.name in new_names:
                if _exists(lambda m=m: self.store.get_volume(user.id, m.name)):  # type: ignore[misc]
                    raise ConflictError(f"a volume named {m.name!r} already exists")
                continue
            vol = self.store.get_volume(user.id, m.name)
            if vol.attached_to is not None:
                raise ConflictError(f"volume {m.name!r} is attached to sandbox {vol.attached_to}")
        secret_env = self.store.get_secret_values(user.id, secret_names)
        if s.images is not None:
            await s.images(image)

        sandbox_id = new_sandbox_id()
        # Before the row: a crash from here on leaves a create to undo at the next start.
        self.intents.begin(Intent(sandbox_id, "create", user.id, tuple(sorted(new_names))))
        try:
            row = self.store.create_sandbox(
                user.id,
                image=image,
                engine=engine,
                name=body.name,
                cpus=cpus,
                memory_mb=memory_mb,
                keep_hot=bool(body.keep_hot),
                config=SandboxConfig(
                    env=env,
                    init=init,
                    volumes=tuple(mounts),
                    secrets=secret_names,
                    runtime=runtime,
                    network=None if network is None else network.to_json(),
                    user=guest_user,
                    workdir=workdir,
                    template=template_name or body.template_id,
                    idempotency=idempotency,
                ),
                new_volumes=[
                    NewVolume(v.name, v.size_mb, str(s.volumes.new_path())) for v in new_volumes
                ],
                status=CREATED.next.status,
                thermal=CREATED.next.thermal,
                sandbox_id=sandbox_id,
                labels=labels,
                expires_at=self._expires_at(body.ttl_s),
                on_expire=OnExpire(body.on_expire or OnExpire.DESTROY),
                node=self.node,
            )
        except BaseException:
            self.intents.end(sandbox_id)
            raise
        crash_point("create.row_written")
        attached = {v.name: v for v in self.store.sandbox_volumes(sandbox_id)}
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            name=row.name,
            cpus=cpus,
            memory_mb=memory_mb,
            image=image,
            env={**env, **secret_env},
            init=init,
            volumes=tuple(s.volumes.engine_spec(attached[m.name], m.mount) for m in mounts),
            keep_hot=bool(body.keep_hot),
            engine=engine,
            runtime=runtime,
            owner=user.id,
            network=network,
            user=guest_user,
            workdir=workdir,
            snapshot=None if saved is None else saved.id,
        )
        self._creating.add(sandbox_id)
        try:
            info = await self.engine.create(spec)
        except BaseException:
            await asyncio.shield(self._undo_create(user, sandbox_id, new_names))
            self.intents.end(sandbox_id)
            raise
        finally:
            self._creating.discard(sandbox_id)
        crash_point("create.engine_done")
        row = self._persist_engine_state(sandbox_id, ip=info.ip)
        crash_point("create.persisted")
        self.intents.end(sandbox_id)
        self.touch(sandbox_id)
        log.info("sandbox %s (%s) created for %s", sandbox_id, row.name, user.name)
        return row

    # --- fork -------------------------------------------------------------------------

    async def fork(self, user: User, ref: str, body: ForkSandbox) -> dict[str, Any]:
        """A new sandbox of ``ref``'s owner whose disk, memory and processes are a copy
        of ``ref``'s now (its engine permitting); both go on independently."""
        src = self.find(user, ref)
        self._created(src)
        if src.config.volumes:
            names = ", ".join(m.name for m in src.config.volumes)
            raise ConflictError(
                f"sandbox {src.name!r} has volumes attached ({names}): a volume cannot be"
                " in two sandboxes, so it cannot be forked"
            )
        try:
            info = self.engine.info(src.id)
        except EngineError:
            info = None
        if info is not None and not info.capabilities.fork:
            runtime = f" on {info.runtime}" if info.runtime else ""
            raise ConflictError(
                f"sandbox {src.name!r} cannot be forked: the {src.engine} engine{runtime}"
                " cannot copy a running sandbox (capabilities.fork is false)"
            )
        self.store.check_quota(user, src.cpus, src.memory_mb)
        name = body.name
        if name is not None and _exists(lambda: self.store.find_sandbox(user.id, name)):
            raise ConflictError(f"a sandbox named {name!r} already exists")
        secret_env = self.store.get_secret_values(user.id, src.config.secrets)
        sandbox_id = new_sandbox_id()
        self.intents.begin(Intent(sandbox_id, "create", user.id))
        try:
            row = self.store.create_sandbox(
                user.id,
                image=src.image,
                engine=src.engine,
                name=name,
                cpus=src.cpus,
                memory_mb=src.memory_mb,
                keep_hot=src.keep_hot,
                config=dataclasses.replace(src.config, idempotency=None),
                status=CREATED.next.status,
                thermal=CREATED.next.thermal,
                sandbox_id=sandbox_id,
                labels=dict(src.labels),
                expires_at=src.expires_at,
                on_expire=src.on_expire,
                node=self.node,  # a fork is a copy of this node's sandbox: here too
            )
        except BaseException:
            self.intents.end(sandbox_id)
            raise
        network = None
        if src.config.network is not None:
            with contextlib.suppress(NetworkError):
                network = NetworkPolicy.from_json(src.config.network)
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            name=row.name,
            cpus=src.cpus,
            memory_mb=src.memory_mb,
            image=src.image,
            env={**src.config.env, **secret_env},
            init=src.config.init,
            keep_hot=src.keep_hot,
            engine=src.engine,
            runtime=src.config.runtime,
            owner=user.id,
            network=network,
            user=src.config.user,
            workdir=src.config.workdir,
        )
        self._creating.add(sandbox_id)
        try:
            async with self._lock(src.id):
                self.store.get_sandbox(src.id)  # 404 if deleted while we waited
                try:
                    info = await self.engine.fork(src.id, spec)
                finally:
                    # The fork may have woken or paused the source: record what it is now.
                    with contextlib.suppress(NotFound):
                        self._persist_engine_state(src.id)
        except BaseException:
            await asyncio.shield(self._undo_create(user, sandbox_id, set()))
            self.intents.end(sandbox_id)
            raise
        finally:
            self._creating.discard(sandbox_id)
        row = self._persist_engine_state(sandbox_id, ip=info.ip)
        self.intents.end(sandbox_id)
        self.touch(src.id)
        self.touch(sandbox_id)
        log.info("sandbox %s (%s) forked from %s for %s", sandbox_id, row.name, src.id, user.name)
        return self.view(row)

    def _network_view(self, sb: SandboxRow) -> dict[str, Any]:
        if sb.config.network is not None:
            try:
                return NetworkPolicy.from_json(sb.config.network).to_json()
            except NetworkError:
                pass  # stored by a newer kiln: show the default rather than fail
        return self._s.config.firewall.default_policy.to_json()

    async def _undo_create(self, user: User, sandbox_id: str, new_volumes: set[str]) -> None:
        try:
            await self.engine.destroy(sandbox_id)
        except EngineError as exc:
            log.warning("sandbox %s: cleanup after a failed create: %s", sandbox_id, exc)
        with contextlib.suppress(NotFound):
            self.store.delete_sandbox(sandbox_id)
        for name in new_volumes:
            with contextlib.suppress(NotFound):
                vol = self.store.delete_volume(user.id, name)
                await self._s.volumes.remove_data(vol)
        self._forget(sandbox_id)

    # --- lifecycle --------------------------------------------------------------------

    def _created(self, sb: SandboxRow) -> None:
        if sb.id in self._creating:
            raise ConflictError(f"sandbox {sb.name!r} is still being created")

    async def delete(self, user: User, ref: str) -> None:
        sb = self.find(user, ref)
        if sb.id in self._creating:
            raise ConflictError(f"sandbox {sb.name!r} is still being created")
        async with self._lock(sb.id):
            sb = self.store.get_sandbox(sb.id)  # 404 if deleted while we waited
            await self._destroy_locked(sb.id)
        self._forget(sb.id)
        await self._reset(sb.id)
        log.info("sandbox %s (%s) deleted", sb.id, sb.name)

    async def _destroy_locked(self, sandbox_id: str) -> None:
        # A crash from here on leaves a destroy to complete at the next start.
        self.intents.begin(
            Intent(sandbox_id, "destroy", self.store.get_sandbox(sandbox_id).user_id)
        )
        try:
            await self.engine.destroy(sandbox_id)
        except SandboxNotFound:
            pass
        except Exception:
            self.intents.end(sandbox_id)  # reported; the sandbox stays as the engine left it
            raise
        crash_point("destroy.engine_done")
        self.store.delete_sandbox(sandbox_id)
        self.intents.end(sandbox_id)

    async def stop(self, user: User, ref: str) -> dict[str, Any]:
        sb = self.find(user, ref)
        self._created(sb)
        async with self._lock(sb.id):
            row = await self._stop_locked(sb.id)
        await self._reset(sb.id)
        self.touch(sb.id)
        return self.view(row)

    async def _stop_locked(self, sandbox_id: str, **changes: Any) -> SandboxRow:
        step = self._plan(Op.STOP, self.store.get_sandbox(sandbox_id))
        await self.engine.stop(sandbox_id)  # the engine plans its own action: it knows the VM
        crash_point("stop.engine_done")
        return self._persist_engine_state(sandbox_id, **_next(step), **changes)

    async def expire(self, sandbox_id: str, now: float) -> ExpiryAction | None:
        """Carry out a sandbox's expiry if it is still due at ``now``; return what was done.

        Decided again under the sandbox's lock: a delete, or a PATCH moving the
        expiry, that got there first wins (None). Expiry is not activity: the
        thermal state is not refreshed.
        """
        if sandbox_id in self._creating:
            return None
        async with self._lock(sandbox_id):
            try:
                sb = self.store.get_sandbox(sandbox_id)
            except NotFound:
                return None
            if not is_due(now, sb):
                return None
            action = action_for(sb)
            match action:
                case Destroy():
                    await self._destroy_locked(sb.id)
                case Stop():
                    await self._stop_locked(sb.id, expires_at=None)
                case Disarm():
                    self.store.update_sandbox(sb.id, expires_at=None)
        if isinstance(action, Destroy | Stop):
            await self._reset(sb.id)
        if isinstance(action, Destroy):
            self._forget(sb.id)
        log.info(
            "sandbox %s (%s) expired: %s",
            sb.id,
            sb.name,
            {Destroy: "destroyed", Stop: "stopped", Disarm: f"already {sb.status}"}[type(action)],
        )
        return action

    async def start(self, user: User, ref: str) -> dict[str, Any]:
        sb = self.find(user, ref)
        self._created(sb)
        async with self._lock(sb.id):
            sb = self.store.get_sandbox(sb.id)  # 404 if deleted while we waited
            step = self._plan(Op.START, sb)
            await self._reset(sb.id)
            info = await self.engine.start(sb.id)
            crash_point("start.engine_done")
            row = self._persist_engine_state(sb.id, **_next(step), ip=info.ip or sb.ip)
        self.touch(sb.id)
        return self.view(row)

    def patch(self, user: User, ref: str, body: PatchSandbox) -> dict[str, Any]:
        sb = self.find(user, ref)
        labels = None if body.labels is None else check_labels(body.labels)
        if body.name is not None and body.name != sb.name:
            sb = self.store.rename_sandbox(sb.id, body.name)
        changes: dict[str, Any] = {}
        if body.keep_hot is not None and body.keep_hot != sb.keep_hot:
            changes["keep_hot"] = body.keep_hot
        if labels is not None:
            changes["labels"] = labels
        if "ttl_s" in body.model_fields_set:  # an explicit null removes the expiry
            changes["expires_at"] = self._expires_at(body.ttl_s)
        if body.on_expire is not None:
            changes["on_expire"] = OnExpire(body.on_expire)
        if changes:
            sb = self.store.update_sandbox(sb.id, **changes)
        return self.view(sb)

    async def agent(self, user: User, ref: str) -> tuple[SandboxRow, AgentClient]:
        """Make the sandbox hot (from any state) and return its agent client."""
        return await self.wake(self.find(user, ref))

    async def wake(self, sb: SandboxRow) -> tuple[SandboxRow, AgentClient]:
        """Make ``sb`` hot (from any state) and return its agent client.

        Concurrent callers that find it cold share one restore: the first does it
        under the sandbox's lock, the others then find it hot.
        """
        self._created(sb)
        self.touch(sb.id)
        step = self._plan(Op.ENSURE_HOT, sb)
        if step.action is Action.NOTHING and step.next == _stored(sb):  # hot, and stored so
            return sb, await self.engine.agent(sb.id)
        async with self._lock(sb.id):
            sb = self.store.get_sandbox(sb.id)  # 404 if deleted while we waited
            before = self._state(sb)
            step = plan(Op.ENSURE_HOT, before, sb.name, snapshots=self._snapshots(sb))
            if step.action.new_machine:
                # Whatever was connected to the sandbox before is gone with its memory.
                await self._reset(sb.id)
            started = time.perf_counter()
            client = await self.engine.agent(sb.id)
            if step.action.new_machine:
                took = (time.perf_counter() - started) * 1000
                log.info("sandbox %s woken from %s in %.0f ms", sb.id, before, took)
            sb = self._persist_engine_state(sb.id, **_next(step))
        return sb, client

    def on_reset(self, hook: Callable[[str], Awaitable[None]]) -> None:
        """Call ``hook(sandbox_id)`` whenever connections into a sandbox stop being
        usable: it was deleted, stopped, started, or is woken from cold."""
        self._reset_hooks.append(hook)

    async def _reset(self, sandbox_id: str) -> None:
        for hook in self._reset_hooks:
            try:
                await hook(sandbox_id)
            except Exception:
                log.exception("reset hook for sandbox %s failed", sandbox_id)

    # --- ports ------------------------------------------------------------------------

    async def ports(self, user: User, ref: str, origin: Origin) -> list[dict[str, Any]]:
        sb, client = await self.agent(user, ref)
        urls = self._s.publishing.urls(sb.id, origin)
        return [_port_entry(sb, p, urls) for p in await listening_ports(client)]

    async def all_ports(self, user: User, origin: Origin) -> list[dict[str, Any]]:
        """Ports of every running sandbox of the user that is hot or warm (cold ones
        are not woken just to be asked)."""
        rows = []
        for sb in self.store.list_sandboxes(user.id):
            if sb.id in self._creating:
                continue
            try:
                info = self.engine.info(sb.id)
            except EngineError:
                continue
            wake = lookup(Op.ENSURE_HOT, observed(_stored(sb), info.state))
            if wake is not None and not wake.action.new_machine:
                rows.append(sb)

        async def one(sb: SandboxRow) -> list[dict[str, Any]]:
            try:
                _, client = await self.agent(user, sb.id)
                urls = self._s.publishing.urls(sb.id, origin)
                async with asyncio.timeout(10):
                    return [_port_entry(sb, p, urls) for p in await listening_ports(client)]
            except (TimeoutError, AgentError, EngineError, NotFound, ConflictError) as exc:
                log.info("ports of sandbox %s: %s", sb.id, exc)
                return []

        results = await asyncio.gather(*(one(sb) for sb in rows))
        return [entry for entries in results for entry in entries]


def _stored(sb: SandboxRow) -> State:
    return State(sb.status, sb.thermal)


def _next(step: Transition) -> dict[str, Any]:
    """The store columns of a transition's next state."""
    return {"status": step.next.status, "thermal": step.next.thermal}


def _port_entry(sb: SandboxRow, port: int, published: dict[int, str]) -> dict[str, Any]:
    return {
        "port": port,
        "proxy_url": f"/sandboxes/{sb.id}/proxy/{port}/",
        "published_url": published.get(port),
        "sandbox_id": sb.id,
        "sandbox_name": sb.name,
    }


def _check_mounts(mounts: Sequence[VolumeMount]) -> None:
    seen_names: set[str] = set()
    seen_mounts: set[str] = set()
    for m in mounts:
        if m.name in seen_names:
            raise Unprocessable(f"volume {m.name!r} is listed twice")
        if m.mount in seen_mounts:
            raise Unprocessable(f"two volumes mounted at {m.mount}")
        if m.mount == "/" or ".." in m.mount.split("/"):
            raise Unprocessable(f"invalid mount point {m.mount!r}")
        seen_names.add(m.name)
        seen_mounts.add(m.mount)


def _exists(lookup: Callable[[], object]) -> bool:
    try:
        lookup()
    except NotFound:
        return False
    return True


# ------------------------------------------------------------------------ templates


class TemplateService:
    def __init__(self, services: Services) -> None:
        self._s = services

    def find(self, user: User, ref: str) -> TemplateRow:
        """By id, else by name; 404 for unknown ones and other users'."""
        return self._s.store.find_template(user.id, check_ref(ref, "template"))

    @staticmethod
    def view(tpl: TemplateRow) -> dict[str, Any]:
        spec = tpl.spec
        return {
            "id": tpl.id,
            "name": tpl.name,
            "cpus": spec.cpus,
            "memory_mb": spec.memory_mb,
            "env": dict(spec.env),
            "init": spec.init,
            "image": spec.image,
            "volumes": [{"name": v.name, "mount": v.mount} for v in spec.volumes],
            "created_at": rfc3339(tpl.created_at),
        }

    def create(self, user: User, body: CreateTemplate) -> dict[str, Any]:
        mounts = [VolumeMount(v.name, v.mount) for v in body.volumes or ()]
        _check_mounts(mounts)
        spec = TemplateSpec(
            cpus=body.cpus,
            memory_mb=body.memory_mb,
            image=body.image,
            env=dict(body.env or {}),
            init=body.init,
            volumes=tuple(mounts),
        )
        return self.view(self._s.store.create_template(user.id, body.name, spec))

    def list_for(self, user: User) -> list[dict[str, Any]]:
        return [self.view(t) for t in self._s.store.list_templates(user.id)]

    def get(self, user: User, ref: str) -> dict[str, Any]:
        return self.view(self.find(user, ref))

    def delete(self, user: User, ref: str) -> None:
        self._s.store.delete_template(user.id, self.find(user, ref).id)


# ------------------------------------------------------------------------ secrets


class SecretService:
    def __init__(self, services: Services) -> None:
        self._s = services

    @staticmethod
    def view(info: SecretInfo) -> dict[str, Any]:
        return {
            "name": info.name,
            "created_at": rfc3339(info.created_at),
            "updated_at": rfc3339(info.updated_at),
        }

    def put(self, user: User, body: PutSecret) -> dict[str, Any]:
        return self.view(self._s.store.put_secret(user.id, body.name, body.value))

    def list_for(self, user: User) -> list[dict[str, Any]]:
        return [self.view(i) for i in self._s.store.list_secrets(user.id)]

    def delete(self, user: User, name: str) -> None:
        self._s.store.delete_secret(user.id, name)


# ------------------------------------------------------------------------ volumes


class VolumeService:
    """Volume rows and their ext4 files.

    A volume's file is ``<data_dir>/volumes/v-<random>.ext4``; the engine knows
    it by the file's stem (unique across users, unlike the user-facing name).
    The file is made by the engine the first time a sandbox attaches the volume
    (``VolumeSpec.size_mb`` set while the file does not exist yet), and removed
    here when the volume is deleted.
    """

    def __init__(self, services: Services) -> None:
        self._s = services

    def new_path(self) -> Path:
        return self._s.config.volumes_dir / f"v-{_secrets.token_hex(8)}.ext4"

    @staticmethod
    def engine_spec(vol: VolumeRow, mount: str) -> VolumeSpec:
        path = Path(vol.path)
        return VolumeSpec(
            name=path.stem, mount=mount, size_mb=None if path.exists() else vol.size_mb
        )

    @staticmethod
    def view(vol: VolumeRow) -> dict[str, Any]:
        return {
            "id": vol.id,
            "name": vol.name,
            "size_mb": vol.size_mb,
            "created_at": rfc3339(vol.created_at),
            "attached_to": vol.attached_to,
            "mount": vol.mount,
        }

    def create(self, user: User, body: CreateVolume) -> dict[str, Any]:
        vol = self._s.store.create_volume(user.id, body.name, body.size_mb, str(self.new_path()))
        crash_point("volume.create.row_written")
        return self.view(vol)

    def list_for(self, user: User) -> list[dict[str, Any]]:
        return [self.view(v) for v in self._s.store.list_volumes(user.id)]

    def get(self, user: User, name: str) -> dict[str, Any]:
        return self.view(self._s.store.get_volume(user.id, check_ref(name, "volume")))

    async def delete(self, user: User, name: str) -> None:
        vol = self._s.store.delete_volume(user.id, check_ref(name, "volume"))
        await self.remove_data(vol)

    async def remove_data(self, vol: VolumeRow) -> None:
        """The engine deletes what it made for the volume (a file, a Docker volume)."""
        try:
            await self._s.engine.delete_volume(Path(vol.path).stem)
        except EngineError as exc:
            log.warning("volume %s: deleting its data: %s", vol.name, exc)


def _network_policy(body: NetworkBody | None) -> NetworkPolicy | None:
    """The policy a create asked for (None: the daemon's default), or 422 saying why."""
    if body is None:
        return None
    try:
        return NetworkPolicy(
            body.egress or "allow", tuple(body.allow or ()), tuple(body.deny or ())
        )
    except NetworkError as exc:
        raise Unprocessable(f"network: {exc}") from None
