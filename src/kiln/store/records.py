"""What the store hands out: frozen dataclasses, never raw rows.

Times are unix seconds (``float``); :func:`rfc3339` formats them for the API.

Numbers and flags that went through JSON (the ``spec`` columns, the HTTP body
that fed them) or through SQLite (``INTEGER`` columns, 0/1 flags) are
normalised here: counts come back as ``int`` (a JSON ``2.0`` becomes ``2``, a
``2.5`` is rejected), flags as ``bool``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from kiln.engine.base import Status, Thermal

from .errors import InvalidValue


def rfc3339(ts: float) -> str:
    """``1700000000.5`` → ``"2023-11-14T22:13:20.500000Z"``."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class OnExpire(StrEnum):
    """What happens to a sandbox when its ``expires_at`` passes."""

    DESTROY = "destroy"
    STOP = "stop"


#: Label limits: generous for real use, small enough that a sandbox row stays small.
MAX_LABELS: Final = 64
MAX_LABEL_KEY: Final = 128
MAX_LABEL_VALUE: Final = 256


def check_labels(value: object, what: str = "labels") -> dict[str, str]:
    """Validated labels: an object of at most :data:`MAX_LABELS` string → string pairs.

    A key is 1..128 printable characters without ``=`` (the list filter is
    ``label=KEY=VALUE``, split at the first ``=``); a value is 0..256 printable
    characters. Raises :class:`InvalidValue` naming the offending label.
    """
    if not isinstance(value, Mapping):
        raise InvalidValue(f"{what} must be an object of strings, got {value!r}")
    if len(value) > MAX_LABELS:
        raise InvalidValue(f"{what}: at most {MAX_LABELS} labels, got {len(value)}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key:
            raise InvalidValue(f"{what}: a label key must be a non-empty string, got {key!r}")
        if len(key) > MAX_LABEL_KEY:
            raise InvalidValue(f"{what}: label key {key[:20]!r}… is over {MAX_LABEL_KEY} chars")
        if "=" in key or not key.isprintable():
            raise InvalidValue(f"{what}: label key {key!r} must be printable and without '='")
        if not isinstance(val, str):
            raise InvalidValue(f"{what}[{key!r}] must be a string, got {val!r}")
        if len(val) > MAX_LABEL_VALUE:
            raise InvalidValue(f"{what}[{key!r}] is over {MAX_LABEL_VALUE} characters")
        if not val.isprintable():
            raise InvalidValue(f"{what}[{key!r}] must be printable")
        out[key] = val
    return out


def labels_match(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Whether every ``wanted`` label is present with that exact value."""
    return all(labels.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-user limits; ``None`` means unlimited."""

    max_sandboxes: int | None = None
    max_cpus: int | None = None  # per sandbox
    max_memory_mb: int | None = None  # per sandbox
    max_image_disk_mb: int | None = None  # all of the user's own images together


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An image in the catalog. ``owner`` None: global (an admin built it).

    ``ref`` is what engines and the image cache know it by (and what a sandbox
    row's ``image`` holds); ``name`` is what its owner calls it. ``kind``:
    ``packages`` (a package-list definition), ``dockerfile``, ``saved`` (a
    sandbox saved as an image) or ``tier``.
    """

    id: str
    owner: str | None
    name: str
    ref: str
    kind: str
    digest: str
    size_bytes: int
    definition: dict[str, Any]
    created_at: float


@dataclass(frozen=True, slots=True)
class User:
    id: str
    name: str
    is_admin: bool
    quotas: Quotas
    created_at: float


@dataclass(frozen=True, slots=True)
class VolumeMount:
    """An existing volume (by name) mounted at ``mount`` inside a sandbox."""

    name: str
    mount: str


@dataclass(frozen=True, slots=True)
class NewVolume:
    """A volume created together with a sandbox (``POST /sandboxes`` ``new_volumes``)."""

    name: str
    size_mb: int
    path: str


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """The parts of a sandbox's spec kept as JSON: enough to boot it again."""

    env: Mapping[str, str] = field(default_factory=dict)
    init: str | None = None
    volumes: tuple[VolumeMount, ...] = ()
    secrets: tuple[str, ...] = ()  # names only; values are looked up at boot
    runtime: str | None = None  # the engine's variant (Docker: runc or runsc)
    #: The egress policy asked for at create (kiln.network.policy JSON); None: the
    #: daemon's default.
    network: Mapping[str, Any] | None = None
    #: The guest's default user; None: the image's sandbox user.
    user: str | None = None
    #: Its commands' default directory (an image's WORKDIR); None: /workspace.
    workdir: str | None = None
    #: The template it was created from, as the client named it (a kiln template, or
    #: an E2B ``templateID``); None: none.
    template: str | None = None
    #: The create's idempotency key and a digest of its request (E2B's
    #: ``Idempotency-Key``): a retry with the same key gets this sandbox.
    idempotency: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Sandbox:
    id: str
    user_id: str
    name: str
    cpus: int
    memory_mb: int
    image: str
    keep_hot: bool
    status: Status
    thermal: Thermal
    ip: str | None
    engine: str
    engine_state: Mapping[str, Any] | None  # exported by the engine, for recovery
    config: SandboxConfig
    created_at: float
    last_active_at: float
    deleted_at: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    expires_at: float | None = None  # unix s; None: lives until deleted
    on_expire: OnExpire = OnExpire.DESTROY
    node: str | None = None  # the cluster node it lives on; None: this daemon's own

    @property
    def live(self) -> bool:
        return self.deleted_at is None


class NodeState(StrEnum):
    """What a node asked to be; whether it is alive is its lease's business."""

    ACTIVE = "active"
    DRAINING = "draining"  # takes no new sandboxes; its stopped ones may move


@dataclass(frozen=True, slots=True)
class Node:
    """One daemon of a cluster sharing a PostgreSQL store."""

    name: str
    address: str  # the base URL other nodes reach its API at
    engines: tuple[str, ...]
    cpus: int
    memory_mb: int
    disk_mb: int
    load: float  # the host's 1-minute load average at the last renewal
    state: NodeState
    starting: int  # creates placed on it that have not finished yet
    registered_at: float
    lease_until: float
    starting_cpus: int = 0  # what the ``starting`` creates asked for
    starting_memory_mb: int = 0

    def lost(self, now: float) -> bool:
        """Its lease ran out: the daemon stopped renewing it (killed, cut off)."""
        return now > self.lease_until

    def status(self, now: float) -> str:
        """``lost``, else its state (``active`` or ``draining``)."""
        return "lost" if self.lost(now) else self.state.value


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """What the live sandboxes placed on a node take of it."""

    sandboxes: int = 0
    cpus: int = 0
    memory_mb: int = 0


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """A node and what its live sandboxes take (what placement weighs)."""

    node: Node
    usage: NodeUsage


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    cpus: int = 1
    memory_mb: int = 512
    image: str | None = None  # None: the default tier
    env: Mapping[str, str] = field(default_factory=dict)
    init: str | None = None
    volumes: tuple[VolumeMount, ...] = ()


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    user_id: str
    name: str
    spec: TemplateSpec
    created_at: float


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """A secret's metadata; values are only ever returned by ``get_secret_values``."""

    name: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Volume:
    id: str
    user_id: str
    name: str
    size_mb: int
    path: str
    created_at: float
    attached_to: str | None = None  # id of the live sandbox using it
    mount: str | None = None


@dataclass(frozen=True, slots=True)
class SavedImageRecord:
    """A sandbox saved as an image: ``id`` is the engine's name for its files."""

    id: str
    user_id: str
    name: str
    engine: str
    #: The image tier the saved sandbox was made from.
    tier: str
    cpus: int
    memory_mb: int
    size_bytes: int
    #: Its memory is in it (sandboxes made from it start with its processes running).
    memory: bool
    source_id: str
    #: The saved sandbox's config (env, init, runtime, network, ...): a sandbox made
    #: from the image has it, as its memory does.
    config: SandboxConfig
    created_at: float


@dataclass(frozen=True, slots=True)
class PublishRule:
    id: str
    sandbox_id: str
    port: int
    alias: str
    created_at: float


# --- normalisation of values that went through JSON or SQLite ----------------------


def as_int(value: object, what: str) -> int:
    """An integer from JSON or SQLite: ``3`` and ``3.0`` pass, ``True``/``3.5``/``"3"`` do not."""
    if isinstance(value, bool):
        raise InvalidValue(f"{what} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise InvalidValue(f"{what} must be an integer, got {value!r}")


def as_opt_int(value: object, what: str) -> int | None:
    return None if value is None else as_int(value, what)


def as_bool(value: object, what: str) -> bool:
    """A flag from JSON (``true``) or SQLite (``1``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise InvalidValue(f"{what} must be a boolean, got {value!r}")


def _as_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, got {value!r}")
    return value


def _as_opt_mapping(value: object, what: str) -> Mapping[str, Any] | None:
    if value is None or isinstance(value, Mapping):
        return value
    raise InvalidValue(f"{what} must be an object or null, got {value!r}")


def _as_opt_str(value: object, what: str) -> str | None:
    return None if value is None else _as_str(value, what)


def _as_env(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidValue(f"{what} must be an object, got {value!r}")
    return {_as_str(k, what): _as_str(v, f"{what}[{k!r}]") for k, v in value.items()}


def _as_list(value: object, what: str) -> Sequence[object]:
    if not isinstance(value, list | tuple):
        raise InvalidValue(f"{what} must be a list, got {value!r}")
    return value


def _mounts_to_json(mounts: Sequence[VolumeMount]) -> list[dict[str, str]]:
    return [{"name": m.name, "mount": m.mount} for m in mounts]


def _mounts_from_json(value: object, what: str) -> tuple[VolumeMount, ...]:
    out = []
    for i, item in enumerate(_as_list(value, what)):
        if not isinstance(item, Mapping):
            raise InvalidValue(f"{what}[{i}] must be an object, got {item!r}")
        out.append(
            VolumeMount(
                _as_str(item.get("name"), f"{what}[{i}].name"),
                _as_str(item.get("mount"), f"{what}[{i}].mount"),
            )
        )
    return tuple(out)


def load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidValue(f"{what} is not valid JSON: {exc}") from exc


def dump_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"{what} cannot be stored as JSON: {exc}") from exc


def config_to_json(config: SandboxConfig) -> str:
    return dump_json(
        {
            "env": _as_env(config.env, "env"),
            "init": _as_opt_str(config.init, "init"),
            "volumes": _mounts_to_json(config.volumes),
            "secrets": [_as_str(s, "secrets") for s in config.secrets],
            "runtime": _as_opt_str(config.runtime, "runtime"),
            "network": None if config.network is None else dict(config.network),
            "user": _as_opt_str(config.user, "user"),
            "workdir": _as_opt_str(config.workdir, "workdir"),
            "template": _as_opt_str(config.template, "template"),
            "idempotency": None if config.idempotency is None else dict(config.idempotency),
        },
        "sandbox config",
    )


def config_from_json(text: str) -> SandboxConfig:
    data = load_json(text, "sandbox config")
    if not isinstance(data, Mapping):
        raise InvalidValue(f"sandbox config must be an object, got {data!r}")
    return SandboxConfig(
        env=_as_env(data.get("env", {}), "env"),
        init=_as_opt_str(data.get("init"), "init"),
        volumes=_mounts_from_json(data.get("volumes", []), "volumes"),
        secrets=tuple(_as_str(s, "secrets") for s in _as_list(data.get("secrets", []), "secrets")),
        runtime=_as_opt_str(data.get("runtime"), "runtime"),
        network=_as_opt_mapping(data.get("network"), "network"),
        user=_as_opt_str(data.get("user"), "user"),
        workdir=_as_opt_str(data.get("workdir"), "workdir"),
        template=_as_opt_str(data.get("template"), "template"),
        idempotency=_as_opt_mapping(data.get("idempotency"), "idempotency"),
    )


def template_spec_to_json(spec: TemplateSpec) -> str:
    return dump_json(
        {
            "cpus": as_int(spec.cpus, "cpus"),
            "memory_mb": as_int(spec.memory_mb, "memory_mb"),
            "image": _as_opt_str(spec.image, "image"),
            "env": _as_env(spec.env, "env"),
            "init": _as_opt_str(spec.init, "init"),
            "volumes": _mounts_to_json(spec.volumes),
        },
        "template spec",
    )


def template_spec_from_json(text: str) -> TemplateSpec:
    data = load_json(text, "template spec")
    if not isinstance(data, Mapping):
        raise InvalidValue(f"template spec must be an object, got {data!r}")
    return TemplateSpec(
        cpus=as_int(data.get("cpus", 1), "cpus"),
        memory_mb=as_int(data.get("memory_mb", 512), "memory_mb"),
        image=_as_opt_str(data.get("image"), "image"),
        env=_as_env(data.get("env", {}), "env"),
        init=_as_opt_str(data.get("init"), "init"),
        volumes=_mounts_from_json(data.get("volumes", []), "volumes"),
    )


def labels_to_json(labels: Mapping[str, str]) -> str:
    return dump_json(check_labels(labels), "labels")


def labels_from_json(text: str) -> dict[str, str]:
    return check_labels(load_json(text, "labels"))


def engine_state_to_json(state: Mapping[str, Any] | None) -> str | None:
    return None if state is None else dump_json(dict(state), "engine state")


def engine_state_from_json(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    data = load_json(text, "engine state")
    if not isinstance(data, dict):
        raise InvalidValue(f"engine state must be an object, got {data!r}")
    return data
