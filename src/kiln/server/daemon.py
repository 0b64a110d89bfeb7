"""The daemon process: ``serve(config)`` (async) and ``run(config)`` (blocking).

Start-up, in order:

1. ``data_dir`` (0700), the store (``store``: by default the SQLite database
   ``data_dir/kiln.db``; or a PostgreSQL database, migrated by whichever daemon
   gets there first), the secret key (``secret_key``: by default
   ``data_dir/secret.key``; it must be the one the store's secrets are sealed
   with, see :func:`_check_secret_key`) and the E2B API's envd token key
   ``e2b-envd.key`` (both 0600, created on first start; a cluster node derives
   the envd key from the cluster secret instead);
2. the listening socket (a clear error when the address is taken);
3. on the very first start, the ``admin`` user: its key goes to
   ``data_dir/admin-api-key`` (0600) and, unless it exists, to the client
   config ``~/.kiln/config.yaml`` as ``{url, token}`` (0600);
4. the engine (``auto``: QEMU when installed; otherwise every sandbox
   operation answers 503 while the rest of the API works), then recovery of
   every live sandbox the store knows, then orphan cleanup;
5. one :class:`asyncio.TaskGroup` owning the thermal manager, the expiry
   reaper (its first tick, right after recovery, handles the sandboxes that
   expired while the daemon was down) and the HTTP server (uvicorn).

SIGTERM or SIGINT shuts down gracefully, within seconds whatever is going on:
the server stops accepting, open requests get a few seconds, an image build in
progress is stopped (its process group gets SIGTERM, then SIGKILL; the next
start builds again), the thermal manager stops, the expiry reaper
finishes the destroy or stop it may be in the middle of, the engine is closed
(sandboxes keep running or stay on disk for the next start's recovery; none
is destroyed) and the store is closed. A second signal skips the wait.

The default image is built right after start (or by the first create that
needs it), in a child process, with its progress in the daemon's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
import yaml

from kiln import faults
from kiln.cluster import ClusterError, ClusterNode
from kiln.cluster.membership import Membership, engine_names, join, resources
from kiln.cluster.takeover import Takeover
from kiln.config import Config, local_url, qemu_missing, resolve_engine
from kiln.engine.base import Engine, SandboxSpec, Thermal
from kiln.engine.errors import EngineError, EngineUnavailable
from kiln.engine.router import Engines, Unavailable
from kiln.images import ImageError
from kiln.images.child import ensure_image_in_child
from kiln.network import Network, NetworkError, close_dialer
from kiln.network.firewall import Firewall, FirewallConfig, table_name
from kiln.recovery import recover
from kiln.store import NotFound, Sandbox, SecretBox, Store, StoreError
from kiln.thermal import ThermalManager, ThermalPolicy

from .app import create_app
from .e2b.filesystem import watchers as e2b_watchers
from .expiry import ExpiryReaper
from .intents import finish_at_start
from .services import Services, persist_engine_state

log = logging.getLogger("kiln.daemon")

ADMIN_USER = "admin"
#: Seconds open requests (streams, shells) get after a shutdown signal.
GRACEFUL_SHUTDOWN_S = 5
#: How long an idle client connection stays open. Longer than clients keep idle
#: connections (httpx: 5 s), so a client always closes first: with both at 5 s a
#: request sent on a connection the server was closing at that instant failed
#: with "server disconnected without sending a response".
KEEP_ALIVE_S = 75


class DaemonError(Exception):
    """The daemon cannot start (address in use, unusable data directory, ...)."""


# ------------------------------------------------------------------ engine


#: Stands in when an engine cannot run here: its sandbox operations answer 503.
UnavailableEngine = Unavailable


def build_engine(config: Config, firewall: Firewall | None = None) -> Engines:
    """Every engine kiln has, each one either ready to use or :class:`Unavailable` with
    the reason; creates go to ``config``'s default unless they name another."""
    return Engines(
        {"qemu": _qemu(config, firewall), "docker": _docker(config, firewall)},
        resolve_engine(config),
    )


def build_firewall(config: Config) -> Firewall | None:
    """The host firewall every engine's sandboxes are admitted to (None when turned
    off); its rules are installed, for no sandbox yet, before anything else runs."""
    settings = config.firewall
    if not settings.enabled:
        log.warning(
            "firewall.enabled is false: sandboxes reach the host, each other and the "
            "host's networks without restriction"
        )
        return None
    with Network(config.network) as network:
        dns = tuple(network.dns_servers())
    firewall = Firewall(
        FirewallConfig(
            table=table_name(config.network.bridge),
            bridges=(config.network.bridge, config.docker.bridge),
            netns=config.network.netns,
            dns=dns,
            blocked=settings.blocked,
            default=settings.default_policy,
            refresh_s=settings.refresh_s,
        )
    )
    try:
        firewall.setup()
    except NetworkError as exc:
        raise DaemonError(f"cannot install the sandbox firewall: {exc}") from exc
    return firewall


async def _refresh_firewall(firewall: Firewall) -> None:
    """Resolve the domain names of sandbox policies again, now and then."""
    while True:
        await asyncio.sleep(firewall.config.refresh_s)
        try:
            if await asyncio.to_thread(firewall.refresh):
                log.info("firewall: policy domain names resolve to new addresses; rules updated")
        except NetworkError as exc:
            log.warning("firewall: refreshing the rules failed: %s", exc)


def _qemu(config: Config, firewall: Firewall | None) -> Engine:
    missing = qemu_missing()
    if missing is not None:
        return Unavailable(f"no QEMU engine here: {missing}", "qemu")
    from kiln.engine.qemu import QemuConfig, QemuEngine  # noqa: PLC0415 -- only when used

    try:
        qemu_config = QemuConfig(
            data_dir=config.data_dir / "qemu",
            volumes_dir=config.volumes_dir,
            image_dir=config.image_dir,
            network=config.network,
            accel=config.accel,
            templates=config.templates,
            shared_template_ram=config.shared_template_ram,
            guest_aslr=config.guest_aslr,
            pool_size=config.pool.size,
            pool_memory_mb=config.pool.memory_mb,
            pool_shapes=tuple(
                (s.image or config.image, s.cpus, s.memory_mb, s.size) for s in config.pool_shapes()
            ),
            shared_dir=config.shared_dir,
            node=config.node_name if config.shared_dir is not None else None,
        )
    except EngineUnavailable as exc:
        return Unavailable(f"QEMU engine: {exc}", "qemu")
    return QemuEngine(qemu_config, firewall)


def _docker(config: Config, firewall: Firewall | None) -> Engine:
    from kiln.engine.docker import (  # noqa: PLC0415 -- only when used
        DockerdConfig,
        DockerEngine,
        DockerEngineConfig,
    )
    from kiln.engine.docker.engine import unavailable_reason  # noqa: PLC0415

    missing = unavailable_reason()
    if missing is not None:
        return Unavailable(f"no Docker engine here: {missing}", "docker")
    try:
        dockerd = DockerdConfig(root=config.docker_root, netns=config.network.netns)
    except ValueError as exc:
        return Unavailable(f"Docker engine: {exc} (set docker.root)", "docker")
    return DockerEngine(
        DockerEngineConfig(
            state_dir=config.data_dir / "docker-engine",
            dockerd=dockerd,
            network=config.docker_network(),
            runtime=config.docker.runtime,
            image_dir=config.image_dir,
            pool_size=config.pool.size,
            pool_memory_mb=config.pool.memory_mb,
        ),
        firewall,
    )


class ImageBuilder:
    """Builds an image tier the first time it is needed, logging its progress.

    A build runs in a child process (:func:`kiln.images.child.ensure_image_in_child`)
    driven by a task this object owns: a request that stops waiting does not stop
    a build others wait for, and :meth:`close` stops every build (the child's
    process group gets SIGTERM, then SIGKILL) before the daemon exits.
    """

    def __init__(self, image_dir: Path | None) -> None:
        self.image_dir = image_dir
        self._ready: set[str] = set()
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    async def __call__(self, tier: str) -> None:
        if tier in self._ready:
            return
        if self._closed:
            raise ImageError("the daemon is shutting down")
        build = self._builds.get(tier)
        if build is None or build.done():  # a failed build is tried again
            build = asyncio.create_task(self._build(tier), name=f"image-{tier}")
            self._builds[tier] = build
        try:
            await asyncio.shield(build)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if build.cancelled() and current is not None and not current.cancelling():
                raise ImageError(
                    "the image build was stopped: the daemon is shutting down"
                ) from None
            raise

    async def _build(self, tier: str) -> None:
        def progress(message: str) -> None:
            log.info("image %s: %s", tier, message)

        log.info("image %s: checking (built on first use; this can take minutes)", tier)
        image = await ensure_image_in_child(tier, self.image_dir, progress)
        log.info("image %s: ready (%s)", tier, image.digest[:16])
        self._ready.add(tier)

    async def close(self) -> None:
        """Stop the builds in progress and wait until their processes are gone."""
        self._closed = True
        running = [b for b in self._builds.values() if not b.done()]
        for build in running:
            build.cancel()
        if running:
            log.info("stopping the image build")
            await asyncio.wait(running)


# ------------------------------------------------------------------ files


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def prepare_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DaemonError(f"cannot create data directory {data_dir}: {exc}") from exc
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DaemonError(f"data directory {data_dir} is not writable")


def client_config_path() -> Path:
    return Path.home() / ".kiln" / "config.yaml"


def _check_secret_key(store: Store, box: SecretBox, config: Config) -> None:
    """The key file must be the one the store's secrets are sealed with. On a shared
    (PostgreSQL) store another key is fatal: this daemon would seal secrets no other
    one can open. On a private one it only warns, as before: the secrets sealed with
    the old key are lost either way, and the daemon is needed to delete them."""
    try:
        if store.claim_secret_key(box.public_key):
            return
    except StoreError as exc:
        raise DaemonError(str(exc)) from exc
    message = (
        f"the secret key {box.key_path} is not the one this store's secrets are sealed"
        " with: every daemon on one store must use the same key file (copy it from a"
        " daemon already running on this store)"
    )
    if config.store_is_shared:
        raise DaemonError(message)
    log.warning("%s; stored secrets cannot be read", message)


def bootstrap_admin(store: Store, config: Config, url: str) -> str | None:
    """Create the ``admin`` user on first start; return its key then (None later)."""
    try:
        store.user_by_name(ADMIN_USER)
    except NotFound:
        pass
    else:
        if not config.admin_key_path.exists():
            log.warning(
                "user %r exists but %s is missing; its key cannot be recovered",
                ADMIN_USER,
                config.admin_key_path,
            )
        return None
    _user, key = store.create_user(ADMIN_USER, admin=True)
    write_private(config.admin_key_path, key + "\n")
    log.info("created user %r; its API key is in %s", ADMIN_USER, config.admin_key_path)
    client_cfg = client_config_path()
    if not client_cfg.exists():
        try:
            client_cfg.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(client_cfg, yaml.safe_dump({"url": url, "token": key}, sort_keys=False))
            log.info("wrote the client configuration %s", client_cfg)
        except OSError as exc:
            log.warning("could not write %s: %s", client_cfg, exc)
    return key


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DaemonError(f"cannot resolve listen address {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return local_url(host, port)


# ------------------------------------------------------------------ serving


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _persist_thermal(store: Store, engine: Engine) -> Callable[[str, Thermal], None]:
    def on_change(sandbox_id: str, thermal: Thermal) -> None:
        with contextlib.suppress(NotFound):
            persist_engine_state(store, engine, sandbox_id, thermal=thermal)

    return on_change


class _Signals:
    """SIGTERM and SIGINT for the daemon's whole life. During start-up they cancel it
    (serve's clean-up still runs); while it serves they start the graceful shutdown,
    and a second one stops waiting for open requests; during the clean-up after
    that they are only logged (it is bounded; SIGKILL is for the impatient)."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._starting = asyncio.current_task()
        self.startup_cancelled = False
        self._server: uvicorn.Server | None = None

    def __enter__(self) -> _Signals:
        for sig in self.HANDLED:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig in self.HANDLED:
            self._loop.remove_signal_handler(sig)

    def serving(self, server: uvicorn.Server) -> None:
        self._starting = None
        self._server = server

    def stopping(self) -> None:
        self._server = None

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._starting is not None:
            log.info("%s during start-up: stopping", name)
            self.stop.set()
            self.startup_cancelled = True
            self._starting.cancel()
            self._starting = None
        elif self._server is not None and not self.stop.is_set():
            log.info("%s: shutting down", name)
            self.stop.set()
        elif self._server is not None:
            log.warning("second %s: not waiting for open requests", name)
            self._server.force_exit = True
        else:
            log.info("%s: already stopping", name)


async def serve(
    config: Config,
    *,
    engine: Engine | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the daemon until SIGTERM/SIGINT. ``engine`` overrides the configured one
    (tests); ``ready(url)`` is called once the API answers."""
    faults.arm()  # crash points, for tests only (kiln.faults)
    prepare_data_dir(config.data_dir)
    box = SecretBox(config.secret_key_path)
    try:
        box.public_key  # noqa: B018 -- create or check the key file now, not on first use
        store = Store.open(config.store_target, secret_box=box)
    except StoreError as exc:
        raise DaemonError(str(exc)) from exc
    log.info("store: %s at %s", store.backend, store.path)
    cluster: ClusterNode | None = None
    try:
        _check_secret_key(store, box, config)
        if config.store_is_shared:
            cluster = join(store, config)
    except ClusterError as exc:
        store.close()
        raise DaemonError(str(exc)) from exc
    except BaseException:
        store.close()
        raise
    node = None if cluster is None else cluster.name
    sock: socket.socket | None = None
    own_engine = engine is None
    firewall: Firewall | None = None
    signals = _Signals()
    try:
        with signals:
            try:
                sock = bind_socket(config.host, config.port)
                url = socket_url(sock)
                bootstrap_admin(store, config, url)
                if engine is None:
                    firewall = await asyncio.to_thread(build_firewall, config)
                    engine = build_engine(config, firewall)
                    await _check_default_engine(engine)
                # One firewall update for every sandbox recovered, not one each.
                with firewall.batch() if firewall is not None else contextlib.nullcontext():
                    await _recover(store, engine, node)
                await finish_at_start(store, engine, config.data_dir)  # cut-off creates, destroys
                await _run(
                    config=config,
                    store=store,
                    engine=engine,
                    sock=sock,
                    url=url,
                    ready=ready,
                    build_images=own_engine,
                    signals=signals,
                    firewall=firewall,
                    cluster=cluster,
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not signals.startup_cancelled or task is None or task.uncancel() > 0:
                    raise
            finally:
                signals.stopping()
                if engine is not None:
                    _save_states(store, engine, node)
                    try:
                        await engine.close()
                    except EngineError as exc:
                        log.warning("closing the engine: %s", exc)
    finally:
        store.close()
        if sock is not None:
            sock.close()
        close_dialer()
        log.info("daemon stopped")


async def _check_default_engine(engines: Engines) -> None:
    """Refuse to start when the default engine cannot run (``kiln serve`` says why)."""
    default = engines.get(engines.name)
    if isinstance(default, Unavailable):
        if engines.name == "qemu":
            return  # today's default: the daemon still serves everything else (503s)
        raise DaemonError(default.reason)
    from kiln.engine.docker.engine import DockerEngine  # noqa: PLC0415

    if isinstance(default, DockerEngine):
        try:
            await default.ready()
        except EngineError as exc:
            raise DaemonError(
                f"{exc}\nThe Docker engine needs dockerd and containerd (Debian: apt-get install"
                " docker.io, which scripts/bootstrap does); kiln starts its own private dockerd"
                f" under {default.config.dockerd.root}. Or run with --engine qemu."
            ) from exc


def _save_states(store: Store, engine: Engine, node: str | None) -> None:
    """Store every sandbox's latest engine state (this node's), for the next start's
    recovery."""
    if isinstance(engine, Unavailable):
        return
    try:
        rows = store.list_live_sandboxes() if node is None else store.list_live_sandboxes(node=node)
    except StoreError as exc:
        log.warning("cannot list sandboxes to save their state: %s", exc)
        return
    for row in rows:
        try:
            store.update_sandbox(row.id, engine_state=engine.export_state(row.id))
        except (EngineError, StoreError) as exc:
            log.debug("no state saved for sandbox %s: %s", row.id, exc)


async def _recover(store: Store, engine: Engine, node: str | None) -> None:
    if isinstance(engine, Unavailable):
        log.warning("engine unavailable: %s", engine.reason)
        return
    names = engine.names if isinstance(engine, Engines) else (engine.name,)
    if isinstance(engine, Engines):
        for reason in engine.available().values():
            if reason is not None:
                log.warning("%s", reason)
    report = await recover(store, engine, engine_names=names, node=node)
    for failed in report.failed:
        log.warning("recovery of sandbox %s: %s", failed.sandbox_id, failed.error)
    try:
        removed = await engine.cleanup_orphans()
    except EngineError as exc:
        log.warning("orphan cleanup failed: %s", exc)
    else:
        for item in removed:
            log.info("removed orphan %s", item)


async def _run(
    *,
    config: Config,
    store: Store,
    engine: Engine,
    sock: socket.socket,
    url: str,
    ready: Callable[[str], None] | None,
    build_images: bool,
    signals: _Signals,
    firewall: Firewall | None = None,
    cluster: ClusterNode | None = None,
) -> None:
    if isinstance(engine, Engines):
        available = any(reason is None for reason in engine.available().values())
    else:
        available = not isinstance(engine, Unavailable)
    thermal = None
    if available:
        t = config.thermal
        thermal = ThermalManager(
            engine,
            sandboxes=_local_sandboxes(store, cluster),
            policy=ThermalPolicy(
                hot_to_warm_s=t.hot_to_warm_s, warm_to_cold_s=t.warm_to_cold_s, tick_s=t.tick_s
            ),
            on_change=_persist_thermal(store, engine),
        )
    images = ImageBuilder(config.image_dir) if available and build_images else None
    services = Services(
        store=store,
        engine=engine,
        config=config,
        thermal=thermal,
        images=images,
        cluster=cluster,
        takeover=(
            Takeover(store, engine, cluster.name)
            if cluster is not None and config.shared_dir is not None
            else None
        ),
    )
    membership = _membership(store, config, engine) if cluster is not None else None
    try:
        _ = services.envd_tokens  # the E2B API's token key: made or read now, not mid-request
    except OSError as exc:
        raise DaemonError(f"cannot load the E2B envd token key: {exc}") from exc
    expiry = ExpiryReaper(services.sandboxes) if available else None
    app = create_app(services)
    server = _Server(
        uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            timeout_keep_alive=KEEP_ALIVE_S,
            ws_max_size=16 << 20,
            server_header=False,  # proxied answers carry the service's own
            # The proxy adds X-Forwarded-For itself: a local client must not be
            # able to choose the address the daemon records for it.
            proxy_headers=False,
        )
    )
    signals.serving(server)
    try:
        async with asyncio.TaskGroup() as tg:
            thermal_task = tg.create_task(thermal.run(), name="thermal") if thermal else None
            if expiry is not None:
                tg.create_task(expiry.run(), name="expiry")
            http = tg.create_task(server.serve(sockets=[sock]), name="http")
            warm_up = (
                tg.create_task(_warm_up(services), name="warm-up") if services.images else None
            )
            refresher = (
                tg.create_task(_refresh_firewall(firewall), name="firewall")
                if firewall is not None
                else None
            )
            stopper = tg.create_task(signals.stop.wait(), name="stop")
            while not server.started and not http.done():  # noqa: ASYNC110 -- uvicorn has no event
                await asyncio.sleep(0.01)
            if server.started and membership is not None:
                # Registered once it answers: no create is placed here before.
                try:
                    await asyncio.to_thread(membership.register)
                except StoreError as exc:  # the lease loop registers it when it can
                    log.warning("cluster: cannot register node %s yet: %s", membership.name, exc)
                tg.create_task(membership.run(), name="lease")
            drain = (
                tg.create_task(services.takeover.drain(config.cluster.lease_s), name="drain")
                if server.started and services.takeover is not None
                else None
            )
            if server.started:
                log.info("kiln daemon listening on %s (engine: %s)", url, engine.name)
                if ready is not None:
                    ready(url)
            await asyncio.wait({http, stopper}, return_when=asyncio.FIRST_COMPLETED)
            server.should_exit = True
            stopper.cancel()
            if drain is not None:
                drain.cancel()  # a move under way completes (it is shielded)
            if membership is not None:
                membership.stop()
                await asyncio.to_thread(membership.leave)
            if warm_up is not None:
                warm_up.cancel()
            # An image build would take minutes: it stops while open requests finish.
            closing = {http}
            if images is not None:
                closing.add(tg.create_task(images.close(), name="image-builds"))
            await asyncio.wait(closing)
            await app.state.node_pools.aclose()  # kept connections to the other nodes
            await e2b_watchers.aclose()  # the E2B SDK's non-streaming directory watches
            if thermal_task is not None:
                thermal_task.cancel()
            if expiry is not None:
                expiry.stop()  # not cancel: a destroy or snapshot in progress completes
            if refresher is not None:
                refresher.cancel()  # its rules stay: sandboxes outlive the daemon
    finally:
        signals.stopping()


def _local_sandboxes(store: Store, cluster: ClusterNode | None) -> Callable[[], list[Sandbox]]:
    """The live sandboxes this daemon's engine runs: all of them on a single daemon,
    this node's in a cluster (another node's are never touched here)."""
    if cluster is None:
        return store.list_live_sandboxes
    name = cluster.name
    return lambda: store.list_live_sandboxes(node=name)


def _membership(store: Store, config: Config, engine: Engine) -> Membership:
    if isinstance(engine, Engines):
        available = engine.available()
        runtimes = {
            n: tuple(getattr(engine.get(n), "runtimes", ()))
            for n, reason in available.items()
            if reason is None
        }
    else:
        available = {engine.name: engine.reason if isinstance(engine, Unavailable) else None}
        runtimes = {}
    return Membership(store, config, resources(config, engine_names(available, runtimes)))


async def _warm_up(services: Services) -> None:
    """Build the default image and its template snapshot in the background, so the
    first create is as fast as the ones after it (a create meanwhile just waits);
    then the same for every shape the warm pool is told to keep."""
    assert services.images is not None
    config = services.config
    shapes = [(config.image, 1, 512)]
    shapes += [(s.image or config.image, s.cpus, s.memory_mb) for s in config.pool_shapes()]
    for n, (image, cpus, memory_mb) in enumerate(shapes):
        spec = SandboxSpec(
            sandbox_id="warm-up", name="warm-up", image=image, cpus=cpus, memory_mb=memory_mb
        )
        try:
            await services.images(spec.image)
            started = time.perf_counter()
            await services.engine.prepare(spec)
            log.info(
                "%s sandbox shape ready (%s, %d vCPU, %d MB, %.1f s)",
                "default" if n == 0 else "pooled",
                image,
                cpus,
                memory_mb,
                time.perf_counter() - started,
            )
        except Exception as exc:  # a warm-up failure must not stop the daemon
            log.warning(
                "warm-up of %s, %d vCPU, %d MB failed (creates will do the work themselves): %s",
                image,
                cpus,
                memory_mb,
                exc,
            )


def run(config: Config) -> None:
    """The blocking daemon entry point (``kiln serve``): logging, then :func:`serve`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    asyncio.run(serve(config))
    # Every thread of the daemon is joined or owned by something its shutdown closes;
    # one still running here would hold up the exit or die in the middle of its work.
    others = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    if others:
        log.warning("threads still running at exit: %s", ", ".join(others))
