"""Setting the guest clock and reseeding its RNG after a resume or restore.

A paused or restored guest's clock is behind by the time it was stopped and does
not catch up, and every restore of one snapshot would continue from the same
kernel RNG state: CLOCK_SET carries the host's time and fresh host randomness.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Final

from kiln.agent_client import AgentClient, AgentTimeout

SEED_BYTES: Final = 64


async def set_clock(client: AgentClient, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """CLOCK_SET with the host's time now and 64 random bytes for the guest's RNG.

    Raises :class:`~kiln.agent_client.AgentError` subclasses like the client does.
    """
    try:
        async with asyncio.timeout(timeout):
            await client.set_clock(seed=secrets.token_bytes(SEED_BYTES))
    except TimeoutError:
        raise AgentTimeout(f"no answer to CLOCK_SET within {timeout} s") from None
