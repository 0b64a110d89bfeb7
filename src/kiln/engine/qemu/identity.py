"""Telling a running clone (a fork's, or a sandbox made from a saved image) who it is.

The clone's memory says it is its origin; its TAP is off the bridge until it
has taken its own identity (:mod:`kiln.guest.reidentify` on the guest side).
Two ways to tell it, tried in this order:

* **a frame** (:mod:`kiln.guest.forkframe`): one Ethernet frame on the detached
  TAP, the clone's agent answers with another. Sent again every
  :data:`_RESEND` s until answered.
* **the config drive**: an identity block appended to the clone's config drive,
  which then grows over it (QMP ``block_resize``); the guest's resize uevent sets
  it going and the console shows :data:`~kiln.guest.config.FORK_READY_LINE`.
  For a clone whose agent predates frames (no answer within
  :data:`_FRAME_PATIENCE` s), or an identity too big for a frame. Slower: the
  block device, the uevent and the console are all paths the clone's first
  requests do not need (~100 ms more under TCG).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Final

from kiln.guest import forkframe
from kiln.guest.config import FORK_READY_LINE, identity_block

from ..errors import EngineError, SandboxCrashed
from . import machine, process
from .machine import VM

log = logging.getLogger(__name__)

#: Bound on the clone taking its identity after the restore (normally < 1 s).
TIMEOUT: Final = 30.0
#: Seconds between identity frames while the clone does not answer.
_RESEND: Final = 0.5
#: After this long without an answer to frames, the config drive (a clone answers in
#: 0.1-0.5 s even on a busy host; one whose agent predates frames costs this much).
_FRAME_PATIENCE: Final = 2.0
_CONSOLE_POLL: Final = 0.01
_SEED_BYTES: Final = 64
_RECV_SIZE: Final = 2048


def fresh(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` with the host's clock now and new randomness for the guest RNG."""
    return {
        **identity,
        "clock_ns": time.time_ns(),
        "seed": base64.b64encode(secrets.token_bytes(_SEED_BYTES)).decode(),
    }


async def tell(vm: VM, frames: socket.socket, identity: dict[str, Any], previous_token: str) -> str:
    """Make the running clone ``vm`` take ``identity`` (config.json fields); how it
    went ("frame", "config drive"). ``frames``: a non-blocking packet socket for
    :data:`~kiln.guest.forkframe.ETHERTYPE` on its detached TAP, opened before the
    clone ran (so that no answer is missed); ``previous_token``: the token its
    agent has now (its origin's)."""
    if await _tell_by_frame(vm, frames, identity, previous_token):
        return "frame"
    await _tell_by_drive(vm, identity)
    return "config drive"


async def _tell_by_frame(
    vm: VM, frames: socket.socket, identity: dict[str, Any], previous_token: str
) -> bool:
    """True once the clone answered; False if it did not within the patience."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FRAME_PATIENCE
    to = (vm.record.tap, forkframe.ETHERTYPE, 0, 0, forkframe.BROADCAST)
    while loop.time() < deadline:
        try:
            payload = forkframe.identity_frame(fresh(identity), previous_token)
        except ValueError as exc:
            log.info("the identity of %s goes by its config drive: %s", vm.sandbox_id, exc)
            return False
        await loop.sock_sendto(frames, payload, to)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_RESEND):
                while True:
                    answer = await loop.sock_recv(frames, _RECV_SIZE)
                    if forkframe.parse_ack_frame(answer) == vm.sandbox_id:
                        return True
        _check_alive(vm)
    log.warning(
        "the clone %s did not answer its identity frame within %.0f s (an older agent?):"
        " trying its config drive",
        vm.sandbox_id,
        _FRAME_PATIENCE,
    )
    return False


async def _tell_by_drive(vm: VM, identity: dict[str, Any]) -> None:
    """Append the identity block to the running clone's config drive, grow the disk
    over it, and wait for the console to say the identity was taken."""
    block = identity_block(fresh(identity))
    size = await asyncio.to_thread(_append, vm.paths.config_drive, block)
    await machine.qmp(vm, "block_resize", {"device": "disk1", "size": size})
    line = f"{FORK_READY_LINE} {vm.sandbox_id},".encode()
    deadline = time.monotonic() + TIMEOUT
    while True:
        with contextlib.suppress(FileNotFoundError):
            if line in await asyncio.to_thread(vm.paths.console_log.read_bytes):
                return
        _check_alive(vm)
        if time.monotonic() > deadline:
            raise EngineError(
                f"the clone {vm.sandbox_id} did not take its identity within"
                f" {TIMEOUT:.0f} s: {machine.console_tail(vm)}"
            )
        await asyncio.sleep(_CONSOLE_POLL)


def _check_alive(vm: VM) -> None:
    if not process.pid_alive(vm.pid, vm.paths.marker):
        raise SandboxCrashed(
            f"the clone {vm.sandbox_id} died while taking its identity: {machine.console_tail(vm)}"
        )


def _append(path: Path, block: bytes) -> int:
    """Blocking: ``block`` at the end of ``path``; the new size."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        offset = os.lseek(fd, 0, os.SEEK_END)
        os.pwrite(fd, block, offset)
        return offset + len(block)
    finally:
        os.close(fd)
