"""Daemon configuration: an optional YAML file plus overrides, validated once.

Every key is optional; the file uses the field names of :class:`Config`, with
``network`` and ``thermal`` as nested mappings::

    data_dir: /var/lib/kiln
    store: null             # null: SQLite in <data_dir>/kiln.db; a file path (SQLite);
                            # or postgresql://user:password@host:5432/kiln
    secret_key: null        # the secrets' age key file (null: <data_dir>/secret.key);
                            # every daemon sharing a PostgreSQL store needs the same one
    listen: 127.0.0.1:8080
    engine: auto            # the default engine: auto (qemu) | qemu | docker
    accel: auto             # auto | kvm | tcg
    image: minimal          # the default image tier
    templates: true         # create by restoring a per-shape template snapshot
    shared_template_ram: false   # clones map their template's RAM copy-on-write
    pool: {size: 2, memory_mb: 2048}   # warm sandboxes of the default shape; 0: none
    # more pooled shapes (image: null = the default image):
    #   pool: {shapes: [{cpus: 2, memory_mb: 1024, image: null, size: 1}]}
    guest_aslr: auto        # auto (on under KVM, off under TCG) | on | off
    network: {bridge: kiln0, subnet: 10.213.0.0/24, netns: null, nat: true}
    thermal: {hot_to_warm_s: 30, warm_to_cold_s: 1800, tick_s: 10}
    docker: {runtime: runc, bridge: kilnd0, subnet: 10.213.1.0/24, root: null}
    firewall: {enabled: true, egress: allow, allow: [], deny: [],
               blocked: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10],
               refresh_s: 60}
    publish_domain: localhost
    max_upload_bytes: 104857600
    # several daemons on one PostgreSQL store (ignored on SQLite):
    cluster: {node: null, advertise: null, secret_file: null, lease_s: 10, shared_dir: null,
              cpus: null, memory_mb: null}

Overrides (from the command line) use the same names, dotted for the nested
ones (``{"network.netns": "kiln-test"}``). A bad value raises
:class:`ConfigError` with one line naming the key; nothing else is raised.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kiln.engine.base import MAX_CPUS, MIN_MEMORY_MB
from kiln.network.config import NetworkConfig
from kiln.network.errors import NetworkError
from kiln.network.firewall import PRIVATE_RANGES
from kiln.network.policy import NetworkPolicy, is_domain, parse_target
from kiln.store.backend import is_postgres_url

ENGINES = ("auto", "qemu", "docker")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
RUNTIMES = ("runc", "runsc")
ACCELS = ("auto", "kvm", "tcg")
QEMU_BINARY = "qemu-system-x86_64"
DEFAULT_LISTEN = "127.0.0.1:8080"
MAX_UPLOAD_BYTES = 100 * 1024 * 1024


class ConfigError(ValueError):
    """The configuration file or an override is invalid (the message says which key)."""


def default_data_dir() -> Path:
    """``/var/lib/kiln`` for root, ``$XDG_DATA_HOME/kiln`` (``~/.local/share/kiln``) otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/kiln")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "kiln"


@dataclass(frozen=True, slots=True)
class ThermalSettings:
    hot_to_warm_s: float = 30.0
    warm_to_cold_s: float = 1800.0
    tick_s: float = 10.0


@dataclass(frozen=True, slots=True)
class PoolShape:
    """One more machine shape the warm pool keeps ``size`` sandboxes of (``image``
    None: the daemon's default image)."""

    cpus: int = 1
    memory_mb: int = 512
    image: str | None = None
    size: int = 1


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The engines' warm pools, each its own (0: none, in every engine). QEMU: ``size``
    sandboxes of the default machine shape (1 vCPU, 512 MB, the default image) kept
    restored, warmed up and paused, and ``size`` of each of ``shapes``. Docker: ``size``
    containers of each shape (the default one, and each from its first create; runc
    and runsc) kept made, warmed up and paused. ``memory_mb`` bounds one engine's members'
    memory together."""

    size: int = 2
    memory_mb: int = 2048
    shapes: tuple[PoolShape, ...] = ()


@dataclass(frozen=True, slots=True)
class DockerSettings:
    """The Docker engine: its default runtime, its own bridge and subnet (not the VMs'),
    and where its private dockerd keeps everything (None: ``<data_dir>/docker``)."""

    runtime: str = "runc"
    bridge: str = "kilnd0"
    subnet: str = "10.213.1.0/24"
    root: Path | None = None


@dataclass(frozen=True, slots=True)
class FirewallSettings:
    """Sandbox isolation (:mod:`kiln.network.firewall`), on unless ``enabled: false``.

    ``egress``, ``allow``, ``deny``: the policy of a sandbox created without one.
    ``blocked``: CIDRs no sandbox reaches whatever its policy (default: the private
    ranges a LAN or VPC uses; the resolvers guests are given stay reachable on port 53).
    ``refresh_s``: how often domain names in policies are resolved again.
    """

    enabled: bool = True
    egress: str = "allow"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    blocked: tuple[str, ...] = PRIVATE_RANGES
    refresh_s: float = 60.0

    @property
    def default_policy(self) -> NetworkPolicy:
        return NetworkPolicy(self.egress, self.allow, self.deny)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Several daemons sharing one PostgreSQL store, each a *node* (ignored on SQLite).

    ``node``: this daemon's name in the cluster (None: the host's name).
    ``advertise``: the base URL other nodes reach this daemon's API at (None: the
    ``listen`` address, when that is one other hosts can reach).
    ``secret_file``: the secret every node shares, which node-to-node calls carry
    (None: ``<data_dir>/cluster-secret``; the same file on every node).
    ``lease_s``: how long a node's registration lasts unrenewed; after that it is lost.
    ``shared_dir``: a directory every node mounts (NFS, ...) for snapshots and disks
    that another node must be able to restore (None: none).
    ``cpus``, ``memory_mb``: what this node offers to sandboxes (None: the host's CPU
    count and memory); less than the host keeps some for itself.
    """

    node: str | None = None
    advertise: str | None = None
    secret_file: Path | None = None
    lease_s: float = 10.0
    shared_dir: Path | None = None
    cpus: int | None = None
    memory_mb: int | None = None


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: Path = field(default_factory=default_data_dir)
    store: str | None = None  # None: SQLite in data_dir; a path (SQLite) or a postgresql:// URL
    secret_key: Path | None = None  # None: data_dir/secret.key
    listen: str = DEFAULT_LISTEN
    engine: str = "auto"
    accel: str = "auto"
    image: str = "minimal"
    image_dir: Path | None = None  # None: kiln.images' default ($KILN_IMAGE_DIR or ~/.cache)
    templates: bool = True
    shared_template_ram: bool = False
    pool: PoolSettings = field(default_factory=PoolSettings)
    guest_aslr: str = "auto"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    thermal: ThermalSettings = field(default_factory=ThermalSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    firewall: FirewallSettings = field(default_factory=FirewallSettings)
    publish_domain: str = "localhost"
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def db_path(self) -> Path:
        """The SQLite file when ``store`` is not set."""
        return self.data_dir / "kiln.db"

    @property
    def store_target(self) -> str:
        """What :meth:`kiln.store.Store.open` opens: a PostgreSQL URL or a SQLite path."""
        if self.store is None:
            return str(self.db_path)
        if is_postgres_url(self.store):
            return self.store
        return os.path.expanduser(self.store)

    @property
    def store_is_shared(self) -> bool:
        """True for a PostgreSQL store, which several daemons may use at once."""
        return self.store is not None and is_postgres_url(self.store)

    @property
    def volumes_dir(self) -> Path:
        """Named volumes' ext4 files (shared by the API and the engine); in the cluster's
        shared directory when there is one, so that a sandbox moves with its volumes."""
        if self.shared_dir is not None:
            return self.shared_dir / "volumes"
        return self.data_dir / "volumes"

    @property
    def shared_dir(self) -> Path | None:
        """``cluster.shared_dir`` when the store is shared (it means nothing on SQLite)."""
        return self.cluster.shared_dir if self.store_is_shared else None

    @property
    def docker_root(self) -> Path:
        return self.docker.root or self.data_dir / "docker"

    def pool_shapes(self) -> tuple[PoolShape, ...]:
        """The extra pooled shapes with their image filled in."""
        return tuple(replace(s, image=s.image or self.image) for s in self.pool.shapes)

    def docker_network(self) -> NetworkConfig:
        """The Docker engine's network: its own bridge and subnet, the rest as the VMs'."""
        return replace(
            self.network,
            bridge=self.docker.bridge,
            subnet=self.docker.subnet,
            bridge_mac=None,
            tap_prefix="kdtap",
        )

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key or self.data_dir / "secret.key"

    @property
    def node_name(self) -> str:
        """This daemon's name among the nodes of a shared store."""
        return self.cluster.node or socket.gethostname()

    @property
    def node_address(self) -> str:
        """The base URL other nodes reach this daemon at (ConfigError when ``listen``
        is a wildcard or loopback address and ``cluster.advertise`` is not set)."""
        if self.cluster.advertise is not None:
            return self.cluster.advertise.rstrip("/")
        host, port = split_listen(self.listen)
        if host in ("0.0.0.0", "::", "") or host == "localhost" or host.startswith("127."):
            raise ConfigError(
                f"cluster.advertise: other nodes cannot reach {self.listen}; set the URL"
                " they reach this daemon at (e.g. http://10.0.0.5:8080)"
            )
        return local_url(host, port)

    @property
    def cluster_secret_path(self) -> Path:
        return self.cluster.secret_file or self.data_dir / "cluster-secret"

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin-api-key"

    @property
    def url(self) -> str:
        """The URL a local client uses to reach this daemon."""
        return local_url(*split_listen(self.listen))


def local_url(host: str, port: int) -> str:
    """The URL a local client uses for a daemon listening on ``host:port``
    (a wildcard address becomes the loopback one)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def split_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:8080"`` for IPv6) → ``(host, port)``."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"listen: expected HOST:PORT, got {listen!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen: port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"listen: expected HOST:PORT, got {listen!r}")
    return host, port


def resolve_engine(config: Config) -> str:
    """The default engine: ``auto`` is ``qemu`` (with KVM where usable, else TCG)."""
    if config.engine != "auto":
        return config.engine
    return "qemu"


def qemu_missing() -> str | None:
    """Why the QEMU engine cannot run here (None: it can)."""
    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} is not installed (apt-get install qemu-system-x86)"
    return None


def _validate(cfg: Config) -> None:
    split_listen(cfg.listen)
    _validate_store(cfg.store)
    if cfg.engine not in ENGINES:
        raise ConfigError(f"engine: must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    if cfg.accel not in ACCELS:
        raise ConfigError(f"accel: must be one of {', '.join(ACCELS)}, got {cfg.accel!r}")
    if cfg.guest_aslr not in ("auto", "on", "off"):
        raise ConfigError(f"guest_aslr: must be auto, on or off, got {cfg.guest_aslr!r}")
    if not cfg.image or "/" in cfg.image:
        raise ConfigError(f"image: not a valid image tier name: {cfg.image!r}")
    if cfg.max_upload_bytes < 1:
        raise ConfigError("max_upload_bytes: must be positive")
    if not cfg.publish_domain or " " in cfg.publish_domain:
        raise ConfigError(f"publish_domain: invalid domain {cfg.publish_domain!r}")
    d = cfg.docker
    if d.runtime not in RUNTIMES:
        raise ConfigError(
            f"docker.runtime: must be one of {', '.join(RUNTIMES)}, got {d.runtime!r}"
        )
    try:
        cfg.docker_network()
    except NetworkError as exc:
        raise ConfigError(f"docker: {exc}") from None
    f = cfg.firewall
    try:
        f.default_policy  # noqa: B018 -- validates egress, allow and deny
        if any(is_domain(parse_target(b)) for b in f.blocked):
            raise NetworkError("blocked holds CIDRs only, not domain names")
    except NetworkError as exc:
        raise ConfigError(f"firewall: {exc}") from None
    if f.refresh_s <= 0:
        raise ConfigError("firewall.refresh_s: must be positive")
    if cfg.pool.size < 0:
        raise ConfigError("pool.size: must not be negative (0 turns the pool off)")
    if cfg.pool.memory_mb < 0:
        raise ConfigError("pool.memory_mb: must not be negative")
    seen: set[tuple[str, int, int]] = set()
    for i, shape in enumerate(cfg.pool.shapes):
        where = f"pool.shapes[{i}]"
        if shape.size < 0:
            raise ConfigError(f"{where}.size: must not be negative")
        if not 1 <= shape.cpus <= MAX_CPUS:
            raise ConfigError(f"{where}.cpus: must be within 1..{MAX_CPUS}")
        if shape.memory_mb < MIN_MEMORY_MB:
            raise ConfigError(f"{where}.memory_mb: must be at least {MIN_MEMORY_MB}")
        if shape.image is not None and (not shape.image or "/" in shape.image):
            raise ConfigError(f"{where}.image: not a valid image name: {shape.image!r}")
        shape_key = (shape.image or cfg.image, shape.cpus, shape.memory_mb)
        if shape_key == (cfg.image, 1, 512):
            raise ConfigError(f"{where}: this is the default shape, whose count is pool.size")
        if shape_key in seen:
            raise ConfigError(f"{where}: this shape is listed twice")
        seen.add(shape_key)
    c = cfg.cluster
    if c.lease_s <= 0:
        raise ConfigError("cluster.lease_s: must be positive")
    if c.node is not None and not _NODE_NAME.fullmatch(c.node):
        raise ConfigError(f"cluster.node: 1-63 letters, digits, '.', '_' or '-', got {c.node!r}")
    for key in ("cpus", "memory_mb"):
        value = getattr(c, key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"cluster.{key}: must be a positive integer, got {value!r}")
    if c.advertise is not None:
        parts = urlsplit(c.advertise)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"cluster.advertise: expected http://HOST:PORT, got {c.advertise!r}")
    t = cfg.thermal
    for key in ("hot_to_warm_s", "warm_to_cold_s", "tick_s"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"thermal.{key}: must be positive")


def _validate_store(store: str | None) -> None:
    if store is None:
        return
    if not store.strip():
        raise ConfigError("store: empty; leave it out for SQLite in data_dir")
    if is_postgres_url(store):
        parts = urlsplit(store)
        if not parts.path.strip("/"):
            raise ConfigError("store: the PostgreSQL URL must name a database (…/dbname)")
        try:
            parts.port  # noqa: B018 -- raises on a port that is not a number
        except ValueError:
            raise ConfigError("store: the PostgreSQL URL has an invalid port") from None
        return
    if "://" in store:
        scheme = store.split("://", 1)[0]
        raise ConfigError(
            f"store: unsupported URL scheme {scheme!r}: give a file path (SQLite)"
            " or a postgresql:// URL"
        )


# ---------------------------------------------------------------- loading


def _coerce(key: str, value: Any, kind: str) -> Any:
    """Check (and lightly convert) one raw value against the field's declared type."""
    if kind in ("str", "str | None"):
        if value is None and kind.endswith("None"):
            return None
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    if kind in ("Path", "Path | None"):
        if value is None and kind.endswith("None"):
            return None
        if isinstance(value, str | os.PathLike):
            return Path(os.path.expanduser(os.fspath(value)))
        raise ConfigError(f"{key}: expected a path, got {type(value).__name__}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind == "int | None" and value is None:
        return None
    if kind in ("int", "float", "int | None"):
        kind = kind.removesuffix(" | None")
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value) if kind == "float" else int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if kind == "int" and isinstance(value, int):
            return value
        if kind == "float" and isinstance(value, int | float):
            return float(value)
        raise ConfigError(f"{key}: expected {'an integer' if kind == 'int' else 'a number'}")
    if kind == "tuple[str, ...]":
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key}: expected a list of strings")
    raise AssertionError(f"unhandled config type {kind}")  # pragma: no cover


def _build(cls: type[Any], raw: Mapping[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        f = known.get(key) if isinstance(key, str) else None
        if f is None:
            raise ConfigError(f"unknown configuration key {full!r}")
        kind = str(f.type)
        if kind == "NetworkConfig":
            kwargs[key] = _network(value, full)
        elif kind == "ThermalSettings":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a mapping")
            kwargs[key] = _build(ThermalSettings, value, f"{full}.")
        elif kind == "tuple[PoolShape, ...]":
            if not isinstance(value, list | tuple):
                raise ConfigError(f"{full}: expected a list of mappings")
            items = []
            for i, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ConfigError(f"{full}[{i}]: expected a mapping")
                items.append(_build(PoolShape, item, f"{full}[{i}]."))
            kwargs[key] = tuple(items)
        elif kind in ("ClusterSettings", "DockerSettings", "FirewallSettings", "PoolSettings"):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a mapping")
            section = _SECTIONS[kind]
            kwargs[key] = _build(section, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, kind)
    return cls(**kwargs) if cls is not Config else kwargs


_SECTIONS: dict[str, type[Any]] = {
    "ClusterSettings": ClusterSettings,
    "DockerSettings": DockerSettings,
    "FirewallSettings": FirewallSettings,
    "PoolSettings": PoolSettings,
}

_NETWORK_KEYS = ("bridge", "subnet", "bridge_mac", "tap_prefix", "netns", "nat", "dns")


def _network(value: Any, key: str) -> NetworkConfig:
    if value is None:
        return NetworkConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping")
    kwargs: dict[str, Any] = {}
    for name, raw in value.items():
        if name not in _NETWORK_KEYS:
            raise ConfigError(f"unknown configuration key '{key}.{name}'")
        item = raw
        if name == "nat":
            item = _coerce(f"{key}.nat", raw, "bool")
        elif name == "dns" and raw is not None:
            if not isinstance(raw, list | tuple):
                raise ConfigError(f"{key}.dns: expected a list of IPv4 addresses")
            item = tuple(raw)
        elif raw is not None:
            item = _coerce(f"{key}.{name}", raw, "str")
        kwargs[name] = item
    try:
        return NetworkConfig(**kwargs)
    except NetworkError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read ``path`` (if given; it must then exist) and apply ``overrides`` on top.

    Overrides whose value is ``None`` are ignored, so a CLI can pass every
    option it has without knowing which ones the user set.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        head, dot, tail = key.partition(".")
        if dot:
            section = raw.get(head)
            if section is None:
                section = raw[head] = {}
            if not isinstance(section, dict):
                raise ConfigError(f"{head}: expected a mapping")
            section[tail] = value
        else:
            raw[key] = value
    kwargs = _build(Config, raw, "")
    try:
        return Config(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def with_overrides(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with top-level fields replaced (validated again)."""
    return replace(config, **changes)
