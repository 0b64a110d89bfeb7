"""Setting the guest clock and reseeding its RNG after a resume or restore.

A paused or restored guest's clock is behind by the time it was stopped and does
not catch up, and every restore of one snapshot would continue from the same
kernel RNG state. The agent's CLOCK_SET takes ``{"unix_ns", "seed"}`` (the seed
is mixed into the guest's entropy pool); :meth:`AgentClient.set_clock` sends
only the time, so this module speaks that one request itself, with the wire
codec of :mod:`kiln.protocol` over the client's own endpoint and token.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Final

from kiln.agent_client import (
    AgentClient,
    AgentConnectError,
    AgentProtocolError,
    AgentTimeout,
    RemoteError,
)
from kiln.protocol import (
    FrameDecoder,
    FrameType,
    ProtocolError,
    StatusResponse,
    encode_frame,
    encode_json,
)

SEED_BYTES: Final = 64


async def set_clock(
    client: AgentClient,
    unix_ns: int | None = None,
    seed: bytes | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> None:
    """CLOCK_SET with the host's time (default now) and ``seed`` (default 64 random bytes).

    Raises :class:`~kiln.agent_client.AgentError` subclasses like the client does.
    """
    if unix_ns is None:
        unix_ns = time.time_ns()
    if seed is None:
        seed = secrets.token_bytes(SEED_BYTES)
    request = encode_json({"unix_ns": unix_ns, "seed": seed.hex()})
    data = encode_frame(FrameType.CLOCK_SET, request)
    if client.token is not None:
        data = encode_frame(FrameType.AUTH, client.token.encode()) + data
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            try:
                sock = await client.endpoint.control()
            except OSError as exc:
                raise AgentConnectError(f"cannot connect to set the clock: {exc}") from exc
            with contextlib.closing(sock):
                await loop.sock_sendall(sock, data)
                decoder = FrameDecoder()
                while (frame := decoder.next_frame()) is None:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        raise AgentProtocolError("the agent closed before answering CLOCK_SET")
                    decoder.feed(chunk)
    except TimeoutError:
        raise AgentTimeout(f"no answer to CLOCK_SET within {timeout} s") from None
    except ProtocolError as exc:
        raise AgentProtocolError(f"bad answer to CLOCK_SET: {exc}") from exc
    except OSError as exc:
        raise AgentConnectError(f"setting the clock failed: {exc}") from exc
    if frame.type == FrameType.ERROR:
        raise RemoteError(frame.payload.decode(errors="replace"))
    if frame.type != FrameType.CLOCK_SET_RESP:
        raise AgentProtocolError(f"expected CLOCK_SET_RESP, got frame type {frame.type:#x}")
    try:
        status = StatusResponse.from_payload(frame.payload)
    except ProtocolError as exc:
        raise AgentProtocolError(f"bad CLOCK_SET_RESP: {exc}") from exc
    if not status.ok:
        raise RemoteError(status.message or "the agent could not set the clock")
