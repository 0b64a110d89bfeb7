"""What a template makes ready before its snapshot, so that no sandbox restored
from it pays for it again.

After a restore the guest runs with an empty translation cache (TCG), so code
run for the first time is slow: measured in a fresh clone, forking the sandbox
user's spawner took 60-100 ms and starting the agent's first worker thread
(the first ``asyncio.to_thread``: the sync() before an exec's EXIT, a durable
file write) ~60 ms. Both are done here instead, once, in the template.
"""

from __future__ import annotations

import logging
import pwd
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kiln.protocol import SANDBOX_USER

from .context import UserInfo, user_credentials
from .spawner import ForkedSpawner, fork_spawner

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    #: The image user's spawner; the agent keeps it if that is still the sandbox user.
    spawner: ForkedSpawner | None = None
    #: The event loop's default executor, its first thread already running.
    executor: ThreadPoolExecutor | None = None


def prepare_template() -> Prepared:
    """Fork the spawner (first: no thread may exist yet), then start a worker thread."""
    spawner = _fork_image_user_spawner()
    executor = ThreadPoolExecutor(thread_name_prefix="asyncio")
    executor.submit(lambda: None).result()
    return Prepared(spawner, executor)


def _fork_image_user_spawner() -> ForkedSpawner | None:
    try:
        user = UserInfo.from_pwd(pwd.getpwnam(SANDBOX_USER))
    except KeyError:
        return None
    creds = user_credentials(user)
    try:
        pid, sock = fork_spawner(creds)
    except OSError as exc:
        log.error("boot: cannot fork a spawner for %s: %s", user.name, exc)
        return None
    return ForkedSpawner(pid, sock, creds)
