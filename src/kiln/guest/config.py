"""The sandbox configuration the host hands the guest (pure: parsing and validation).

It arrives as ``config.json`` on the config drive (a small ext4 disk, normally
``/dev/vdb``), or, for a machine started without one, as dotted parameters on the
kernel command line (``kiln.ip=10.0.0.5/24 kiln.gw=10.0.0.1 kiln.token=...``).
The same JSON can be given with ``--config`` (also in test mode, for the init
session).

``config.json`` fields (all optional)::

    {
      "sandbox_id": "sbx-1",
      "hostname": "sbx-1",
      "token": "hex",
      "env": {"KEY": "value"},
      "files": [{"path": "/etc/x", "content": "<base64>", "mode": "0644"}],
      "volumes": [{"device": "/dev/vdc", "mount": "/data", "fstype": "ext4", "size": 1048576}],
      "init": "shell script, run as the TTY session 'init'",
      "dns": ["10.0.0.1"],
      "user": "sandbox",
      "network": {"address": "10.0.0.5/24", "gateway": "10.0.0.1", "mac": "52:54:..."},
      "session_idle_timeout": 3600,
      "aslr": false,
      "clock_ns": 1763700000000000000,
      "seed": "<base64>",
      "user_dirs": ["/data"]
    }

``clock_ns`` (the host's time when it wrote the drive) and ``seed`` (random
bytes for the kernel RNG) matter to a sandbox restored from a template snapshot:
its clock is as old as the template and its RNG state is every other clone's.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.protocol import SANDBOX_USER, InvalidMessage, parse_mode

from .errors import ConfigError

#: Where PID 1 looks for the config drive unless ``kiln.config=`` says otherwise.
DEFAULT_CONFIG_DEVICE = "/dev/vdb"
CONFIG_MOUNT = "/run/kiln/config"
CONFIG_FILE = "config.json"
#: The first bytes of a template's placeholder config drive (an ext4's first
#: 1024 bytes are zeros, so a real drive never starts with them); see pid1.
TEMPLATE_MAGIC = b"KILN-TEMPLATE-WAIT\n"
#: What the console shows once a template boot waits for its config drive.
TEMPLATE_READY_LINE = "template: waiting for a config drive"
#: What the console shows, followed by the new sandbox id and a comma, once a fork's
#: clone has taken its own identity (see :mod:`kiln.guest.reidentify`).
FORK_READY_LINE = "fork: identity taken by"
#: Starts the block a fork's host appends to the clone's config drive (after the
#: ext4 image, whose size the guest kernel knew): then an 8-byte big-endian length
#: and that many bytes of identity JSON (the config.json fields of an identity).
IDENTITY_MAGIC = b"KILN-FORK-IDENTITY\n"
#: How many bytes that block takes (the drive grows by as much).
IDENTITY_BLOCK = 1 << 20

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_ENV_NAME = re.compile(r"^[^=\x00]+$")


@dataclass(frozen=True, slots=True)
class FileSpec:
    path: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    device: str
    mount: str
    fstype: str = "ext4"
    #: The disk's size in bytes, if known: a template-restored guest learns a
    #: volume's real size only when the host's capacity change reaches it.
    size: int | None = None


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    address: str  # "10.0.0.5/24"
    gateway: str | None = None
    mac: str | None = None
    interface: str = "eth0"


@dataclass(frozen=True, slots=True)
class GuestConfig:
    sandbox_id: str | None = None
    hostname: str | None = None
    token: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    files: tuple[FileSpec, ...] = ()
    volumes: tuple[VolumeSpec, ...] = ()
    init: str | None = None
    dns: tuple[str, ...] = ()
    user: str = SANDBOX_USER
    network: NetworkSpec | None = None
    session_idle_timeout: float | None = None
    clock_ns: int | None = None
    seed: bytes | None = None
    #: Address space randomization for the guest's processes (None: kernel default).
    aslr: bool | None = None
    #: Directories the sandbox user owns, made at every start (a container's volumes).
    user_dirs: tuple[str, ...] = ()
    #: The default working directory of commands (an image's WORKDIR); None: /workspace.
    workdir: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> GuestConfig:
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        user = _opt_str(data, "user") or SANDBOX_USER
        if not _USERNAME.match(user):
            raise ConfigError(f"config 'user': {user!r} is not a valid user name")
        hostname = _opt_str(data, "hostname")
        if hostname is not None and not _HOSTNAME.match(hostname):
            raise ConfigError(f"config 'hostname': {hostname!r} is not a valid host name")
        timeout = data.get("session_idle_timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise ConfigError("config 'session_idle_timeout' must be a number of seconds ≥ 0")
        return cls(
            sandbox_id=_opt_str(data, "sandbox_id"),
            hostname=hostname,
            token=_opt_str(data, "token") or None,
            env=_env(data.get("env")),
            files=tuple(_file(i, f) for i, f in enumerate(_list(data, "files"))),
            volumes=tuple(_volume(i, v) for i, v in enumerate(_list(data, "volumes"))),
            init=_opt_str(data, "init") or None,
            dns=tuple(_ip(f"dns[{i}]", d) for i, d in enumerate(_list(data, "dns"))),
            user=user,
            network=_network(data.get("network")),
            session_idle_timeout=float(timeout) if timeout else None,
            clock_ns=_clock_ns(data.get("clock_ns")),
            seed=_seed(data.get("seed")),
            aslr=_opt_bool(data, "aslr"),
            user_dirs=tuple(
                _abs_path(f"user_dirs[{i}]", d) for i, d in enumerate(_list(data, "user_dirs"))
            ),
            workdir=None if data.get("workdir") is None else _abs_path("workdir", data["workdir"]),
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> GuestConfig:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        return cls.from_json(data)

    @classmethod
    def load(cls, path: Path) -> GuestConfig:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        return cls.from_bytes(raw)


def parse_cmdline(text: str) -> dict[str, str]:
    """The ``kiln.*`` parameters of a kernel command line, without the prefix."""
    out: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("kiln.") and len(key) > 5:
            out[key[5:]] = value
    return out


def config_from_cmdline(params: Mapping[str, str]) -> GuestConfig:
    """The fallback configuration of a machine started without a config drive."""
    data: dict[str, Any] = {
        "token": params.get("token"),
        "hostname": params.get("hostname"),
        "dns": [d for d in params.get("dns", "").split(",") if d],
    }
    if "ip" in params:
        data["network"] = {"address": params["ip"], "gateway": params.get("gw") or None}
    return GuestConfig.from_json(data)


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"config {key!r} must be a string, got {type(value).__name__}")
    return value


def _opt_bool(data: Mapping[str, Any], key: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"config {key!r} must be true or false")
    return value


def _clock_ns(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError("config 'clock_ns' must be a positive integer (ns since the epoch)")
    return value


def _seed(value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError("config 'seed' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True) or None
    except binascii.Error as exc:
        raise ConfigError(f"config 'seed' is not valid base64: {exc}") from None


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"config {key!r} must be a list, got {type(value).__name__}")
    return value


def _env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("config 'env' must be an object of strings")
    for key, item in value.items():
        if not _ENV_NAME.match(key) or not isinstance(item, str) or "\x00" in item:
            raise ConfigError(f"config 'env': bad entry {key!r}")
    return dict(value)


def _abs_path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise ConfigError(f"config {where} must be an absolute path, got {value!r}")
    return value


def _file(index: int, item: Any) -> FileSpec:
    where = f"files[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"config {where} must be an object")
    content = item.get("content", "")
    if not isinstance(content, str):
        raise ConfigError(f"config {where}.content must be base64 text")
    try:
        raw = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"config {where}.content is not valid base64") from exc
    return FileSpec(
        path=_abs_path(f"{where}.path", item.get("path")),
        content=raw,
        mode=_mode(where, item.get("mode")),
    )


def _mode(where: str, value: Any) -> int:
    if value is None:
        return 0o644
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777:
        return value
    if isinstance(value, str):
        try:
            return parse_mode(value)
        except InvalidMessage as exc:
            raise ConfigError(f"config {where}.mode: {exc}") from exc
    raise ConfigError(f'config {where}.mode must be an octal string like "0644"')


def _volume(index: int, item: Any) -> VolumeSpec:
    where = f"volumes[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"config {where} must be an object")
    fstype = item.get("fstype") or "ext4"
    if not isinstance(fstype, str):
        raise ConfigError(f"config {where}.fstype must be a string")
    size = item.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ConfigError(f"config {where}.size must be a number of bytes")
    return VolumeSpec(
        device=_abs_path(f"{where}.device", item.get("device")),
        mount=_abs_path(f"{where}.mount", item.get("mount")),
        fstype=fstype,
        size=size,
    )


def _ip(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"config {where} must be an IP address string")
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ConfigError(f"config {where}: {value!r} is not an IP address") from exc
    return value


def _network(value: Any) -> NetworkSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError("config 'network' must be an object")
    address = value.get("address")
    if not isinstance(address, str) or "/" not in address:
        raise ConfigError("config network.address must look like 10.0.0.5/24")
    try:
        ipaddress.ip_interface(address)
    except ValueError as exc:
        raise ConfigError(f"config network.address: {address!r} is not ADDRESS/PREFIX") from exc
    gateway = value.get("gateway")
    if gateway is not None:
        gateway = _ip("network.gateway", gateway)
    mac = value.get("mac")
    if mac is not None and (not isinstance(mac, str) or not _MAC.match(mac)):
        raise ConfigError(f"config network.mac: {mac!r} is not a MAC address")
    interface = value.get("interface") or "eth0"
    if not isinstance(interface, str) or not re.match(r"^[A-Za-z0-9._-]{1,15}$", interface):
        raise ConfigError(f"config network.interface: {interface!r} is not an interface name")
    return NetworkSpec(address=address, gateway=gateway, mac=mac, interface=interface)


_IDENTITY_HEADER = len(IDENTITY_MAGIC) + 8


def identity_block(config: dict[str, object]) -> bytes:
    """The block the host appends (the guest's inverse is :func:`parse_identity`)."""
    payload = json.dumps(config, separators=(",", ":")).encode()
    block = IDENTITY_MAGIC + struct.pack(">Q", len(payload)) + payload
    if len(block) > IDENTITY_BLOCK:
        raise ValueError(f"identity of {len(payload)} bytes does not fit {IDENTITY_BLOCK}")
    return block.ljust(IDENTITY_BLOCK, b"\0")


def parse_identity(head: bytes, read_more: Callable[[int, int], bytes]) -> GuestConfig | None:
    """The identity in a block starting with ``head`` (``read_more(offset, n)`` reads
    past it); None if the block is not one."""
    if not head.startswith(IDENTITY_MAGIC) or len(head) < _IDENTITY_HEADER:
        return None
    (length,) = struct.unpack(">Q", head[len(IDENTITY_MAGIC) : _IDENTITY_HEADER])
    if length > IDENTITY_BLOCK - _IDENTITY_HEADER:
        raise ConfigError(f"identity block claims {length} bytes")
    payload = head[_IDENTITY_HEADER : _IDENTITY_HEADER + length]
    if len(payload) < length:
        payload += read_more(_IDENTITY_HEADER + len(payload), length - len(payload))
    return GuestConfig.from_bytes(payload)
