"""The Docker Engine API side of a sandbox: its network, container and volumes.

Blocking calls through the docker SDK (the engine runs them in threads), each
translating the SDK's errors into the engine's once (:func:`docker_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import docker.errors
import docker.types
import requests.exceptions

from kiln.engine.base import SandboxSpec, guest_hostname
from kiln.engine.errors import EngineError, EngineUnavailable, InvalidState, SandboxCrashed
from kiln.engine.states import Found

from .config import DockerEngineConfig
from .hostname import SETTER
from .record import (
    CONFIG_FILE,
    GUEST_AGENT,
    GUEST_CONFIG,
    LABEL,
    OWNER_LABEL,
    VOLUME_LABEL,
    Record,
    volume_name,
)

log = logging.getLogger(__name__)

#: How long a pause or unpause refused as a conflict (state not caught up) is retried.
CONFLICT_PATIENCE = 2.0
#: The SDK's failures that mean "dockerd did not answer" rather than "it said no".
UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException)


@contextlib.contextmanager
def docker_errors(what: str) -> Iterator[None]:
    """The Docker SDK's and the host's errors as EngineErrors, once, where the call is."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise SandboxCrashed(f"{what}: {_explain(exc)}") from exc
    except docker.errors.APIError as exc:
        raise EngineError(f"{what}: {_explain(exc)}") from exc
    except UNREACHABLE as exc:
        raise EngineUnavailable(f"{what}: dockerd does not answer: {exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise EngineError(f"{what}: {exc}") from exc


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)


def ensure_network(client: Any, config: DockerEngineConfig, subnet: IPv4Network) -> None:
    """A bridge network on kiln's bridge, so the addresses are kiln's pool's."""
    bridge = config.network.bridge
    gateway = str(next(subnet.hosts()))
    name = config.network_name
    for existing in client.networks.list(names=[name]):
        attrs = existing.attrs
        pools = (attrs.get("IPAM") or {}).get("Config") or []
        on = (attrs.get("Options") or {}).get("com.docker.network.bridge.name")
        if on == bridge and any(p.get("Subnet") == str(subnet) for p in pools):
            return
        log.info("Docker network %s is for another bridge or subnet: re-creating", name)
        existing.remove()
    client.networks.create(
        name,
        driver="bridge",
        options={"com.docker.network.bridge.name": bridge},
        ipam=docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=gateway)]
        ),
    )


def make_volumes(client: Any, spec: SandboxSpec) -> list[str]:
    """Docker volumes for the spec's volumes that do not exist yet; their names."""
    made = []
    for vol in spec.volumes:
        name = volume_name(vol.name)
        with docker_errors(f"volume {vol.name}"):
            try:
                client.volumes.get(name)
                continue
            except docker.errors.NotFound:
                pass
            client.volumes.create(name, labels={VOLUME_LABEL: vol.name})
        made.append(name)
    return made


def remove_volume(client: Any, name: str) -> None:
    """Remove a Docker volume (InvalidState while a container uses it; gone is fine)."""
    with docker_errors(f"deleting volume {name}"):
        try:
            client.volumes.get(name).remove()
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise InvalidState(f"volume {name} is in use by a container") from exc
            raise


def create_container(
    client: Any,
    config: DockerEngineConfig,
    record: Record,
    directory: Path,
    dns: list[str],
    *,
    cpu_shares: int | None = None,
    setter: Path | None = None,
) -> None:
    """``cpu_shares``: its CPU weight (None: Docker's default, 1024); ``setter``: the
    host name setter to mount (:func:`.hostname.setter_mount`)."""
    spec = record.spec
    api = client.api
    hostname = guest_hostname(spec.name)
    mounts = [
        docker.types.Mount(GUEST_AGENT, record.agent, type="bind", read_only=True),
        docker.types.Mount(GUEST_CONFIG, str(directory / CONFIG_FILE), type="bind", read_only=True),
        *(docker.types.Mount(v.mount, volume_name(v.name), type="volume") for v in spec.volumes),
    ]
    if setter is not None:
        mounts.append(docker.types.Mount(SETTER, str(setter), type="bind", read_only=True))
    memory = f"{spec.memory_mb}m"
    host_config = api.create_host_config(
        runtime=record.runtime,
        nano_cpus=spec.cpus * 1_000_000_000,
        cpu_shares=cpu_shares,
        mem_limit=memory,
        memswap_limit=memory,  # no swap: memory_mb is what it gets, as in a VM
        mounts=mounts,
        dns=dns or None,
        **_own_network(record, hostname),
        # Docker's default set keeps NET_RAW (so root could forge addresses past the
        # host firewall); ping still works through ICMP sockets (ping_group_range).
        cap_drop=["NET_RAW"],
        log_config=docker.types.LogConfig(
            type="json-file", config={"max-size": "1m", "max-file": "1"}
        ),
    )
    networking = None
    if not record.own_network:
        endpoint = api.create_endpoint_config(ipv4_address=record.ip)
        networking = api.create_networking_config({config.network_name: endpoint})
    api.create_container(
        image=record.image,
        # -S: the agent is stdlib-only, and site's start-up is time before it answers.
        command=["/usr/bin/python3", "-S", GUEST_AGENT, "--container", "--config", GUEST_CONFIG],
        name=record.container,
        hostname=hostname,
        labels={LABEL: record.sandbox_id, OWNER_LABEL: config.owner},
        host_config=host_config,
        networking_config=networking,
        stop_signal="SIGTERM",
    )


def _own_network(record: Record, hostname: str) -> dict[str, Any]:
    """Host config of a container whose eth0 the engine plumbs (see Record.own_network)."""
    if not record.own_network:
        return {}
    return {
        "network_mode": "none",
        # What a user-defined network's /etc/hosts has: the host name at its address.
        "extra_hosts": {hostname: record.ip},
    }


def pause(client: Any, name: str, *, resume: bool = False) -> None:
    """``docker pause`` (or unpause), retried while dockerd's state trails the last one.

    dockerd 20.10 records a pause when containerd's event arrives, after its
    answer: an unpause right after a pause can hear "is not paused" (409)."""
    call = client.api.unpause if resume else client.api.pause
    deadline = time.monotonic() + CONFLICT_PATIENCE
    while True:
        try:
            call(name)
            return
        except docker.errors.APIError as exc:
            if exc.status_code != 409 or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def start(client: Any, name: str) -> int | None:
    """Start the container; its main process's host pid."""
    client.api.start(name)
    attrs = client.api.inspect_container(name)
    return int(attrs["State"].get("Pid") or 0) or None


def image_exists(client: Any, ref: str) -> bool:
    try:
        client.api.inspect_image(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def remove_container(client: Any, name: str) -> None:
    """Force-remove it whatever its state (gone already is fine)."""
    with docker_errors(f"removing container {name}"):
        # Unpause first: a paused runsc sandbox can hang a forced remove. (Not
        # paused, or gone: an APIError.)
        with contextlib.suppress(docker.errors.APIError):
            client.api.unpause(name)
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(name, force=True)


def logs_tail(client: Any, name: str, lines: int = 6) -> str:
    """The container's last output lines on one line, for error messages."""
    try:
        raw = client.api.logs(name, tail=lines)
    except UNREACHABLE as exc:
        return f"(no container output: {exc})"
    text = raw.decode(errors="replace").strip()
    return " | ".join(text.splitlines()[-lines:]) or "(no container output)"


def find(client: Any, name: str) -> tuple[Found, int | None]:
    """What is left of a sandbox's container, and its main pid if it runs."""
    try:
        attrs = client.api.inspect_container(name)
    except docker.errors.NotFound:
        return Found.NOTHING, None
    except UNREACHABLE as exc:
        raise EngineUnavailable(f"dockerd does not answer: {exc}") from exc
    st = attrs["State"]
    if st.get("Running"):
        return (Found.PAUSED if st.get("Paused") else Found.RUNNING), int(st["Pid"]) or None
    return Found.SNAPSHOT, None  # an exited container: its files, to boot again


def own_containers(client: Any, config: DockerEngineConfig) -> list[tuple[str, str]]:
    """(container id, sandbox id) of every container this engine made."""
    with docker_errors("listing containers"):
        found = client.api.containers(
            all=True, filters={"label": [LABEL, f"{OWNER_LABEL}={config.owner}"]}
        )
    return [(c["Id"], (c.get("Labels") or {}).get(LABEL, "")) for c in found]
