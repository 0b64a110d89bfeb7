"""A private dockerd for kiln: start (or adopt), probe and stop one.

kiln never uses the host's Docker daemon, nor its containerd. It runs a
containerd and a dockerd of its own, every path under one root (layout in
:mod:`.config`), and talks to them with the ``docker`` SDK.

The command lines, and why
--------------------------
``containerd --config ROOT/run/containerd/containerd.toml`` and ``dockerd --containerd=...``
    started by kiln rather than by dockerd: dockerd 20.10 only supervises a
    containerd of its own when ``/run/containerd/containerd.sock`` does not
    exist; if it does (any host with Docker or containerd installed, even a
    stale socket) it uses that one and kiln's dockerd is no longer private.
    Our containerd also collects garbage after every deletion, which
    checkpoint restores need (:func:`containerd_toml`).
``--config-file ROOT/daemon.json``
    the host's ``/etc/docker/daemon.json`` is never read; the file only registers
    runsc (a runtime with arguments cannot be given as a flag).
``--bridge=none`` (``bridge=None``) or ``--bridge=NAME``
    dockerd never creates ``docker0`` or picks a subnet of its own. With a name,
    the default network is that existing bridge, address and all: the one
    :class:`kiln.network.Network` sets up for the Docker engine, with kiln's fixed
    MAC, subnet and egress rules, as for QEMU sandboxes. With ``none``
    containers get a network only when the engine attaches one.
``--iptables=false --ip-forward=false``
    kiln.network owns the firewall (one MASQUERADE and two FORWARD accepts per
    bridge, tagged ``kiln:<bridge>``) and ``ip_forward``, for every engine.
    Docker's rules would be a second, different set in the same tables:
    measured here, ``--iptables=true`` sets the FORWARD policy to DROP and adds
    DOCKER, DOCKER-USER and two DOCKER-ISOLATION chains and its own MASQUERADE.
``--storage-driver=overlay2``
    ``vfs`` copies the whole image for every container (see
    ``docs/docker-notes.md`` for the numbers). ``storage_driver`` overrides it
    where the data root cannot carry overlayfs.
``--exec-opt=native.cgroupdriver=cgroupfs --cgroup-parent=/kiln-dockerd-<hash>``
    no systemd on these hosts; the containers of each private dockerd live in a
    cgroup of their own (hash of ``ROOT``), so stopping and cleaning up find,
    thaw and kill exactly its own and nobody else's.
``--experimental``
    ``docker checkpoint`` (runsc's checkpoint/restore) needs it on Docker 20.10.
``--group=root``
    the socket is ``root:root 0660``: whoever can talk to it controls every
    sandbox, so the host's ``docker`` group gets no access.
runsc
    registered when installed (``runsc=None`` leaves it out), through the
    wrapper of :mod:`.runsc` where this host's kernel and runsc need it.

Lifecycle
---------
:meth:`Dockerd.start` adopts a dockerd already running for the same root (its
pid file names a live dockerd with our exec root on its command line, and it
answers), so a restarted kiln daemon finds its containers where it left them.
Otherwise it clears what a crashed one left (:func:`cleanup_leftovers`),
starts containerd and then dockerd, each in its own session (with ``netns``:
inside that network namespace through ``nsenter``, which changes nothing
else -- their mounts stay visible to the host), and waits until the socket
answers. :meth:`Dockerd.stop` kills the containers, sends dockerd and then
containerd SIGTERM (SIGKILL after a grace period) and clears leftovers.

Everything here blocks (subprocesses, the docker SDK); from async code use
``asyncio.to_thread``. A :class:`Dockerd` is not meant to be shared between
threads. Errors are described in :mod:`.errors`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Self, TypeVar

import docker
import docker.errors

from . import host
from .config import DockerdConfig
from .errors import DockerdError, DockerdNotInstalled, DockerdStartFailed, DockerdUnavailable
from .runsc import (
    daemon_json,
    kernel_shows_rmem_default_everywhere,
    needs_netns_workaround,
    runsc_release_date,
    runsc_version,
    runsc_wrapper,
)

#: How long :meth:`Dockerd.start` waits for containerd and dockerd to answer (≈0.3 s here).
START_TIMEOUT: Final = 30.0
#: How long containerd gets to exit on SIGTERM.
CONTAINERD_GRACE: Final = 10.0
_LOG_TAIL_LINES: Final = 12
_START_MARK: Final = "--- kiln: starting"
_POLL: Final = 0.01
_INSTALL_HINT: Final = "Debian: apt-get install docker.io runsc; scripts/bootstrap installs both"
T = TypeVar("T")


# -- command lines and config files (pure) ------------------------------------------------


def _in_netns(config: DockerdConfig, argv: list[str]) -> list[str]:
    if config.netns is None:
        return argv
    return ["nsenter", f"--net=/run/netns/{config.netns}", "--", *argv]


def containerd_argv(config: DockerdConfig, containerd: str) -> list[str]:
    """The containerd command line for ``config`` (``containerd``: the resolved program)."""
    return _in_netns(
        config,
        [containerd, f"--config={config.containerd_config}", f"--log-level={config.log_level}"],
    )


def containerd_toml(config: DockerdConfig) -> str:
    """containerd's config: its own root, state and socket; no CRI (kiln is no kubelet).

    ``deletion_threshold = 1`` collects garbage after every deletion. dockerd
    20.10 leaves a checkpoint's blob in containerd's content store (it deletes
    only the image naming it); restoring uploads the same blob again, and until
    the collector has run that fails with "content sha256:... already exists"
    (moby#42900). With containerd's defaults 3 of the first 6 restores failed
    here; with this setting none of about 40.
    """

    def q(path: Path) -> str:
        return json.dumps(str(path))  # a TOML basic string

    return (
        "# Written by kiln (kiln.engine.docker.daemon) on every start.\n"
        "version = 2\n"
        f"root = {q(config.containerd_root)}\n"
        f"state = {q(config.containerd_dir / 'state')}\n"
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "\n"
        "[grpc]\n"
        f"  address = {q(config.containerd_socket)}\n"
        "\n"
        '[plugins."io.containerd.gc.v1.scheduler"]\n'
        "  deletion_threshold = 1\n"
    )


def dockerd_argv(config: DockerdConfig, dockerd: str) -> list[str]:
    """The dockerd command line for ``config`` (``dockerd``: the resolved program)."""
    argv = [
        dockerd,
        f"--config-file={config.config_file}",
        f"--data-root={config.data_root}",
        f"--exec-root={config.exec_root}",
        f"--pidfile={config.pidfile}",
        f"--host=unix://{config.socket_path}",
        f"--containerd={config.containerd_socket}",
        "--group=root",
        f"--bridge={config.bridge or 'none'}",
        f"--iptables={str(config.iptables).lower()}",
        "--ip-forward=false",
        f"--storage-driver={config.storage_driver}",
        "--exec-opt=native.cgroupdriver=cgroupfs",
        f"--cgroup-parent={config.cgroup_parent}",
        f"--shutdown-timeout={config.shutdown_timeout}",
        f"--log-level={config.log_level}",
    ]
    if config.experimental:
        argv.append("--experimental")
    return _in_netns(config, argv)


# -- asking a daemon ----------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonInfo:
    """What :func:`probe` learned from a dockerd that answered."""

    version: str
    api_version: str
    storage_driver: str
    cgroup_driver: str
    runtimes: tuple[str, ...]
    default_runtime: str
    experimental: bool
    root_dir: str


def _daemon_info(info: dict[str, Any], api_version: str) -> DaemonInfo:
    return DaemonInfo(
        version=str(info.get("ServerVersion", "")),
        api_version=api_version,
        storage_driver=str(info.get("Driver", "")),
        cgroup_driver=str(info.get("CgroupDriver", "")),
        runtimes=tuple(sorted(info.get("Runtimes") or {})),
        default_runtime=str(info.get("DefaultRuntime", "")),
        experimental=bool(info.get("ExperimentalBuild", False)),
        root_dir=str(info.get("DockerRootDir", "")),
    )


def _why(exc: BaseException) -> str:
    """A short reason for a failed connection, from the OSError buried in the SDK's chain."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, FileNotFoundError):
            return "no socket there"
        if isinstance(item, ConnectionRefusedError):
            return "the socket exists but nothing accepts connections (a stale socket?)"
        if isinstance(item, PermissionError):
            return "permission denied (it needs root)"
        if isinstance(item, TimeoutError) or "timed out" in str(item).lower():
            return "it did not answer in time"
        todo += [item.__cause__, item.__context__, *item.args]
    return str(exc) or type(exc).__name__


def _connect_unix(path: str | Path, timeout: float) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))


def sdk_client(url: str, *, timeout: float = 60.0, version: str | None = None) -> Any:
    """A ``docker.DockerClient`` for ``url``; the caller closes it.

    For a ``unix://`` URL the socket is connected once with the standard library
    first: the SDK (docker 7.x, ``UnixHTTPConnection.connect``) leaks its socket
    when ``connect()`` fails, and the plain attempt raises the precise OSError
    (no socket, refused, permission) instead. ``version=None`` asks the daemon.
    """
    if url.startswith("unix://"):
        _connect_unix(url.removeprefix("unix://"), timeout)
    return docker.DockerClient(base_url=url, timeout=timeout, version=version)


def probe(url: str, *, runtimes: Sequence[str] = (), timeout: float = 5.0) -> DaemonInfo:
    """Ask the dockerd at ``url`` (``unix:///path``) who it is; raise unless it is usable.

    Usable means: it answers ``/_ping`` and ``/info`` within ``timeout``, and has
    every runtime in ``runtimes``. Raises :class:`DockerdUnavailable` with the
    reason otherwise -- the message ``kiln serve`` shows when Docker is selected.
    """
    try:
        with contextlib.closing(sdk_client(url, timeout=timeout)) as client:
            client.ping()
            raw = client.info()
            api_version = str(client.api.api_version)
    except (docker.errors.DockerException, OSError) as exc:
        raise DockerdUnavailable(
            f"no Docker daemon answers at {url}: {_why(exc)}. kiln's Docker engine needs "
            f"dockerd ({_INSTALL_HINT}); kiln starts a private one itself, or point it "
            "at a running one"
        ) from exc
    info = _daemon_info(raw, api_version)
    missing = [name for name in runtimes if name not in info.runtimes]
    if missing:
        raise DockerdUnavailable(
            f"the Docker daemon at {url} has no runtime {', '.join(map(repr, missing))} "
            f"(it has {', '.join(info.runtimes) or 'none'}); for runsc install gVisor "
            "(Debian: apt-get install runsc) and register it in daemon.json"
        )
    return info


# -- what belongs to a daemon, and clearing it up -----------------------------------------


def _running_dockerd(config: DockerdConfig) -> int | None:
    return host.pid_from_file(config.pidfile, f"--exec-root={config.exec_root}")


def _running_containerd(config: DockerdConfig) -> int | None:
    return host.pid_from_file(config.containerd_pidfile, f"--config={config.containerd_config}")


@dataclass(frozen=True)
class Leftovers:
    """What :func:`cleanup_leftovers` found and removed."""

    killed: tuple[int, ...] = ()
    unmounted: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()

    @property
    def processes_or_mounts(self) -> bool:
        """True if anything but cgroup directories was left (dockerd leaves those when clean)."""
        return bool(self.killed or self.unmounted)


def cleanup_leftovers(config: DockerdConfig) -> Leftovers:
    """Remove what a dockerd for ``config`` left behind after it stopped or died.

    In this order: SIGKILL every process whose command line names the exec root
    (containerd, its shims, runsc's gofer and sandbox); every task in the cgroup
    parent (container processes; paused ones are thawed after the signal);
    unmount everything at or below the data and exec roots (lazily, innermost
    first); remove the cgroups; delete a stale pid file and socket; and, once
    nothing is mounted below it, the exec root. Raises :class:`DockerdError` if
    a dockerd for ``config`` still runs: stop it first.
    """
    running = _running_dockerd(config)
    if running is not None:
        raise DockerdError(f"dockerd (pid {running}) still runs for {config.root}; stop it first")
    killed = host.processes_mentioning(config.exec_root)
    for pid in killed:
        host.send_signal(pid, signal.SIGKILL)
    groups, tasks = host.kill_cgroups(config.cgroup_parent or "")
    killed += [pid for pid in tasks if pid not in killed]
    host.wait_all_gone(killed)
    unmounted = [
        p for p in host.mounts_below((config.data_root, config.exec_root)) if host.unmount(p)
    ]
    removed = host.remove_cgroups(groups)
    for stale in (config.pidfile, config.socket_path):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    # The exec root is run-time state, like /run after a reboot: dockerd and
    # containerd rebuild it, and take containers they find no task for as
    # exited. Its stale pid files would even do harm here: where PID 1 does not
    # reap orphans, a killed process stays a zombie and its pid looks alive.
    if config.exec_root.exists() and not host.mounts_below((config.exec_root,)):
        shutil.rmtree(config.exec_root, ignore_errors=True)
    return Leftovers(tuple(sorted(killed)), tuple(unmounted), tuple(removed))


def running_processes(config: DockerdConfig) -> Iterator[int]:
    """Live processes of the dockerd for ``config``: dockerd, containerd, shims, runsc and
    every task in its cgroups (for checks and tests)."""
    seen: set[int] = set()
    found = [_running_dockerd(config), _running_containerd(config)]
    found += host.processes_mentioning(config.exec_root)
    for top in host.cgroup_dirs(config.cgroup_parent or ""):
        for group in host.cgroup_tree(top):
            found += [pid for pid in host.cgroup_pids(group) if not host.is_zombie(pid)]
    for pid in found:
        if pid is not None and pid not in seen:
            seen.add(pid)
            yield pid


def _kill_containers(url: str, timeout: float = 30.0) -> bool:
    """Kill every running or paused container at ``url`` and wait for each to exit;
    False if the API failed on the way."""
    try:
        with contextlib.closing(sdk_client(url, timeout=timeout)) as client:
            listed = client.api.containers(filters={"status": "running"})
            listed += client.api.containers(filters={"status": "paused"})
            for c in listed:
                if c.get("State") == "paused":  # docker waits 10 s to kill a paused one
                    with contextlib.suppress(docker.errors.APIError):
                        client.api.unpause(c["Id"])
                with contextlib.suppress(docker.errors.APIError):
                    client.api.kill(c["Id"])
            for c in listed:
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.wait(c["Id"], timeout=timeout)
    except (docker.errors.DockerException, OSError):
        return False
    return True


def _write_atomic(path: Path, content: str, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# -- the daemon ---------------------------------------------------------------------------


@dataclass
class _Running:
    dockerd: int
    containerd: int | None
    info: DaemonInfo
    runsc_wrapped: bool
    procs: tuple[subprocess.Popen[bytes], ...] = ()  # ours to reap; empty when adopted


class Dockerd:
    """One private dockerd (and its containerd), described by a :class:`DockerdConfig`.

    The constructor does no I/O. ``with Dockerd(config) as d:`` starts it and
    stops it on the way out, whatever happens inside.
    """

    def __init__(self, config: DockerdConfig) -> None:
        self._config = config
        self._running: _Running | None = None

    @property
    def config(self) -> DockerdConfig:
        return self._config

    @property
    def url(self) -> str:
        return self._config.url

    @property
    def pid(self) -> int | None:
        """dockerd's pid while started."""
        return None if self._running is None else self._running.dockerd

    @property
    def containerd_pid(self) -> int | None:
        return None if self._running is None else self._running.containerd

    @property
    def info(self) -> DaemonInfo:
        """What the daemon reported when it started (or was adopted)."""
        if self._running is None:
            raise DockerdError("dockerd is not started")
        return self._running.info

    @property
    def adopted(self) -> bool:
        """True if :meth:`start` found this dockerd already running rather than starting it."""
        return self._running is not None and not self._running.procs

    @property
    def runsc_wrapped(self) -> bool:
        """True if runsc is registered through the netns workaround wrapper (:mod:`.runsc`)."""
        return self._running is not None and self._running.runsc_wrapped

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def client(self, *, timeout: float = 60.0) -> Any:
        """A new ``docker.DockerClient`` for this daemon; the caller closes it."""
        return sdk_client(self.url, timeout=timeout, version=self.info.api_version)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log since kiln last started the daemon."""
        try:
            text = self._config.log_path.read_text(errors="replace")
        except OSError:
            return ""
        mark = text.rfind(f"{_START_MARK} containerd")
        if mark >= 0:
            text = text[text.find("\n", mark) + 1 :]
        text = "\n".join(line for line in text.splitlines() if not line.startswith(_START_MARK))
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- start ----------------------------------------------------------------------------

    def start(self, *, timeout: float = START_TIMEOUT) -> DaemonInfo:
        """Adopt the dockerd already running for this root, or start one; return its info.

        Raises :class:`DockerdNotInstalled` if dockerd or containerd is missing,
        :class:`DockerdStartFailed` if either exits or stays silent for
        ``timeout`` seconds (both are then killed and their leftovers removed).
        """
        if self._running is not None:
            return self._running.info
        cfg = self._config
        dockerd, containerd = shutil.which(cfg.dockerd), shutil.which(cfg.containerd)
        for name, found in ((cfg.dockerd, dockerd), (cfg.containerd, containerd)):
            if found is None:
                raise DockerdNotInstalled(
                    f"cannot find {name!r}: kiln's Docker engine needs it ({_INSTALL_HINT})"
                )
        assert dockerd is not None and containerd is not None
        if cfg.netns is not None:
            if shutil.which("nsenter") is None:
                raise DockerdNotInstalled("nsenter is not installed (Debian: util-linux)")
            if not Path(f"/run/netns/{cfg.netns}").exists():
                raise DockerdStartFailed(f"network namespace {cfg.netns!r} does not exist")

        adopted = self._adopt(timeout)
        if adopted is not None:
            self._running = adopted
            return adopted.info

        cleanup_leftovers(cfg)
        wrapped = self._prepare_files()
        deadline = time.monotonic() + timeout
        procs: list[subprocess.Popen[bytes]] = []
        try:
            ctr = self._spawn("containerd", containerd_argv(cfg, containerd))
            procs.append(ctr)
            cfg.containerd_pidfile.write_text(f"{ctr.pid}\n")
            self._wait(
                ctr, "containerd", deadline, lambda: self._connectable(cfg.containerd_socket)
            )
            dkd = self._spawn("dockerd", dockerd_argv(cfg, dockerd))
            procs.append(dkd)
            info = self._wait(dkd, "dockerd", deadline, self._answers)
        except BaseException:
            for proc in reversed(procs):
                host.send_signal(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(host.KILL_WAIT)
            with contextlib.suppress(DockerdError):
                cleanup_leftovers(cfg)
            raise
        self._running = _Running(dkd.pid, ctr.pid, info, wrapped, tuple(procs))
        return info

    def _prepare_files(self) -> bool:
        """Directories, daemon.json, containerd.toml and (if needed) the runsc wrapper;
        True if runsc goes through the wrapper."""
        cfg = self._config
        cfg.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.data_root.mkdir(exist_ok=True, mode=0o710)
        cfg.containerd_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            cfg.socket_path.unlink()  # no dockerd of ours runs: it is stale
        runsc = None if cfg.runsc is None else shutil.which(cfg.runsc)
        wrapped = False
        registered = runsc
        if runsc is not None:
            date = runsc_release_date(runsc_version(runsc))
            wrapped = needs_netns_workaround(kernel_shows_rmem_default_everywhere(), date)
            if wrapped:
                _write_atomic(cfg.runsc_wrapper_path, runsc_wrapper(runsc), mode=0o755)
                registered = str(cfg.runsc_wrapper_path)
        content = json.dumps(daemon_json(registered, cfg.runsc_args), indent=2) + "\n"
        _write_atomic(cfg.config_file, content, mode=0o600)
        _write_atomic(cfg.containerd_config, containerd_toml(cfg), mode=0o600)
        return wrapped

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self._config.log_path, "ab") as log:
            _log_line(log, f"{_START_MARK} {name} at {time.strftime('%F %T')}: {shlex.join(argv)}")
            try:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl+C at kiln's terminal is not for it
                    close_fds=True,
                )
            except OSError as exc:
                raise DockerdStartFailed(f"cannot run {argv[0]}: {exc.strerror}") from exc

    def _connectable(self, path: Path) -> bool | None:
        try:
            _connect_unix(path, 1.0)
        except OSError:
            return None
        return True

    def _answers(self) -> DaemonInfo | None:
        if not self._config.socket_path.exists():
            return None
        try:
            return probe(self.url, timeout=5.0)
        except DockerdUnavailable:
            return None

    def _wait(
        self,
        proc: subprocess.Popen[bytes],
        name: str,
        deadline: float,
        ready: Callable[[], T | None],
    ) -> T:
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail() or "(nothing)"
                raise DockerdStartFailed(
                    f"{name} exited with status {code} while starting; "
                    f"{self._config.log_path} ends with:\n{tail}{_hint(tail)}"
                )
            result = ready()
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise DockerdStartFailed(
                    f"{name} did not answer within the start timeout; "
                    f"{self._config.log_path} ends with:\n{self.log_tail() or '(nothing)'}"
                )
            time.sleep(_POLL)

    def _adopt(self, timeout: float) -> _Running | None:
        """The running dockerd for this root if it answers within ``timeout``; else None
        (a running one that stays silent is killed, so a fresh one can start)."""
        pid = _running_dockerd(self._config)
        if pid is None:
            return None
        deadline = time.monotonic() + timeout
        while _running_dockerd(self._config) == pid:
            info = self._answers()
            if info is not None:
                wrapped = self._config.runsc_wrapper_path.exists()
                return _Running(pid, _running_containerd(self._config), info, wrapped)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        host.send_signal(pid, signal.SIGKILL)
        host.wait_gone(pid, host.KILL_WAIT)
        return None

    # -- stop -----------------------------------------------------------------------------

    def stop(self, *, timeout: float | None = None, kill_containers: bool = True) -> Leftovers:
        """Stop the dockerd for this root (ours or adopted, or one found by its pid file).

        With ``kill_containers`` (the default) every running container is killed
        first through the API (paused ones unpaused first: docker waits 10 s
        before it kills a paused one), so dockerd releases their mounts and
        networks at once; if the API fails, every task in our cgroups gets
        SIGKILL instead. Without it dockerd stops them itself on SIGTERM, each
        with its stop timeout (10 s for a PID 1 that ignores SIGTERM). Then
        SIGTERM to dockerd, SIGKILL after ``timeout`` seconds (default:
        ``shutdown_timeout`` + 10); the same for containerd; then
        :func:`cleanup_leftovers`, whose findings are returned. Idempotent, and
        safe to call when nothing runs.
        """
        cfg = self._config
        running, self._running = self._running, None
        procs = {p.pid: p for p in (running.procs if running is not None else ())}
        dockerd = running.dockerd if running is not None else _running_dockerd(cfg)
        containerd = running.containerd if running is not None else _running_containerd(cfg)
        if dockerd is not None and not host.is_zombie(dockerd):
            if kill_containers and not _kill_containers(self.url):
                host.wait_all_gone(host.kill_cgroups(cfg.cgroup_parent or "")[1])
            grace = cfg.shutdown_timeout + 10.0 if timeout is None else timeout
            host.terminate(dockerd, grace, procs.get(dockerd))
        if containerd is not None and not host.is_zombie(containerd):
            host.terminate(containerd, CONTAINERD_GRACE, procs.get(containerd))
        for proc in procs.values():  # reap whatever exited on its own
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(host.KILL_WAIT)
        return cleanup_leftovers(cfg)


def _log_line(log: BinaryIO, line: str) -> None:
    log.write(f"{line}\n".encode())
    log.flush()


def _hint(log_tail: str) -> str:
    """What to do about a start failure whose cause the log names but does not explain."""
    if "cgroup isn't mounted" in log_tail or "cgroup not mounted" in log_tail:
        return (
            "\nThe cgroup file systems are not mounted where kiln runs. `ip netns exec`"
            " mounts a fresh /sys without them: run kiln in the host's mounts (for a"
            " network namespace of its own, `nsenter --net=/run/netns/NAME` or"
            " network.netns in kiln's config)."
        )
    return ""
