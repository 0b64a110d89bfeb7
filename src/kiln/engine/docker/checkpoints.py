"""``docker checkpoint create`` and ``docker start --checkpoint``, made repeatable.

The docker SDK has neither call; these POST to the Engine API. Three fixes make
checkpoints usable with runsc here (docs/docker-notes.md): ``Exit`` must be true,
containerd must garbage-collect the checkpoint blob at once (its config), and
runsc's stale "paused" state must be cleared after each checkpoint.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import docker.errors

from .config import DockerdConfig
from .runsc import clear_checkpointed_state, runsc_root

EXIT_TIMEOUT = 30.0


def post(client: Any, path: str, **kwargs: Any) -> None:
    """POST to an Engine API path the SDK has no method for; APIError on failure."""
    url = f"{client.api.base_url}/v{client.api.api_version}{path}"
    response = client.api.post(url, **kwargs)
    if response.status_code >= 400:
        raise docker.errors.APIError(
            f"{response.status_code} {response.reason} for POST {path}",
            response=response,
            explanation=response.text.strip(),
        )


def checkpoint(client: Any, config: DockerdConfig, container_id: str, name: str) -> None:
    """Checkpoint the container as ``name`` and wait until it has exited; then clear
    runsc's stale state so it can be checkpointed again after its restore."""
    # "Exit" defaults to false in the API (the CLI sends true); leaving a runsc
    # sandbox running panics runsc 2022 ("invalid state transition: paused => stopped").
    body = {"CheckpointID": name, "Exit": True}
    post(client, f"/containers/{container_id}/checkpoints", json=body)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while client.api.inspect_container(container_id)["State"]["Running"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"container {container_id} still runs after its checkpoint")
        time.sleep(0.005)  # the exit event may trail the API's answer
    runsc = None if config.runsc is None else shutil.which(config.runsc)
    if runsc is not None:
        clear_checkpointed_state(runsc, runsc_root(config.exec_root), container_id)


def start_from_checkpoint(client: Any, container_id: str, name: str) -> None:
    """``docker start --checkpoint NAME`` (the checkpoint is kept: delete it after)."""
    post(client, f"/containers/{container_id}/start", params={"checkpoint": name})


def delete_checkpoint(client: Any, container_id: str, name: str) -> None:
    api = client.api
    url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/checkpoints/{name}"
    response = api.delete(url)
    if response.status_code >= 400 and response.status_code != 404:
        raise docker.errors.APIError(
            f"{response.status_code} {response.reason} deleting checkpoint {name}",
            response=response,
            explanation=response.text.strip(),
        )
