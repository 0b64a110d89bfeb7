"""What the Docker engine keeps of a sandbox on disk, and the guest's config it writes.

    STATE/sandboxes/<id>/record.json   :class:`Record`: the immutable facts (written at create)
    STATE/sandboxes/<id>/config.json   the guest agent's config, bind-mounted read-only

A sandbox made from a warm-pool member (:mod:`.pool`) keeps the member's
directory for its ``config.json`` (the container's bind mount names that path)
and the member's id on its container's label and its veth:
:attr:`Record.member`.

The container itself (its writable layer, a checkpoint) is dockerd's; the record
is what lets a restarted daemon find it again by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine.base import SandboxSpec
from kiln.network import GuestNetwork, address_mac

RECORD_VERSION = 1
RECORD_FILE = "record.json"
CONFIG_FILE = "config.json"
#: Where the container sees its config and the agent (both bind-mounted read-only).
GUEST_CONFIG = "/run/kiln/config.json"
GUEST_AGENT = "/usr/lib/kiln/agent.pyz"
#: Label on everything the engine makes in its dockerd (containers, volumes).
LABEL = "io.kiln.sandbox"
OWNER_LABEL = "io.kiln.owner"
VOLUME_LABEL = "io.kiln.volume"


def container_name(sandbox_id: str) -> str:
    return f"kiln-{sandbox_id}"


def volume_name(volume_id: str) -> str:
    return f"kiln-{volume_id}"


@dataclass(slots=True)
class Record:
    spec: SandboxSpec
    runtime: str
    token: str
    ip: str
    image: str  # the Docker image reference it was created from
    agent: str  # the agent zipapp on the host, bind-mounted at GUEST_AGENT
    created_volumes: tuple[str, ...] = ()
    created_at: float = 0.0
    #: Its container runs with ``--network none`` and the engine plumbs its eth0
    #: (:meth:`kiln.network.Network.attach_container`) at every start; False: it is
    #: on the engine's Docker network (runsc, which reads its interfaces when it
    #: starts, before the engine could add one; and records written before).
    own_network: bool = False
    #: The warm-pool member this sandbox was made from (None: made for it). Docker
    #: fixes at create what names the member: its container's label and host name,
    #: its config's bind-mount source (``STATE/sandboxes/<member>/config.json``);
    #: the engine names its veth after it too.
    member: str | None = None

    @property
    def sandbox_id(self) -> str:
        return self.spec.sandbox_id

    @property
    def made_as(self) -> str:
        """The id its container, config directory and veth were made under."""
        return self.member or self.spec.sandbox_id

    @property
    def container(self) -> str:
        return container_name(self.spec.sandbox_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "spec": self.spec.to_json(),
            "runtime": self.runtime,
            "token": self.token,
            "ip": self.ip,
            "image": self.image,
            "agent": self.agent,
            "created_volumes": list(self.created_volumes),
            "created_at": self.created_at,
            "own_network": self.own_network,
            "member": self.member,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(
            spec=SandboxSpec.from_json(data["spec"]),
            runtime=str(data["runtime"]),
            token=str(data["token"]),
            ip=str(data["ip"]),
            image=str(data["image"]),
            agent=str(data["agent"]),
            created_volumes=tuple(str(v) for v in data.get("created_volumes") or ()),
            created_at=float(data.get("created_at", 0.0)),
            own_network=bool(data.get("own_network", False)),
            member=_opt_str(data.get("member")),
        )

    def save(self, directory: Path) -> None:
        write_atomic(directory / RECORD_FILE, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, directory: Path) -> Record:
        return cls.from_json(json.loads((directory / RECORD_FILE).read_text()))


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def guest_config(record: Record, network: GuestNetwork | None = None) -> dict[str, Any]:
    """The agent's ``config.json`` (see :mod:`kiln.guest.config`). The runtime does the
    host name and DNS, the engine or dockerd the network; the volumes' roots must
    become the user's. ``network``: the eth0 the engine plumbs, which the agent
    waits for before it runs the init script."""
    config = record.spec.guest_config(record.token)
    config["user_dirs"] = [v.mount for v in record.spec.volumes]
    if network is not None:
        config["network"] = {
            "address": network["address"],
            "gateway": network["gateway"],
            "mac": address_mac(record.ip),
        }
    return config


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
