"""What an engine's test module gives the conformance suite: an :class:`EngineKit`.

The suite does everything through the :class:`~kiln.engine.base.Engine`
interface and the agent client an engine hands out. The kit supplies what the
interface cannot: how to make the engine, a spec it can run, where a sandbox's
commands start, and two looks from outside the engine (a crash it did not
cause, what of a sandbox is left on the host).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Protocol, runtime_checkable

from ..base import Engine, SandboxSpec

#: The home of the suite's shared engine (its sandboxes live for a test class).
MAIN_HOME: Final = "main"
#: The home of the daemon-restart and orphan tests: engines are opened there one
#: at a time, each closed (never destroyed) before the next, as a restarting daemon.
RESTART_HOME: Final = "restart"


@runtime_checkable
class EngineKit(Protocol):
    """One engine's side of the conformance suite.

    Attributes:

    ``has_ip``
        Sandboxes get an address of their own: ``SandboxInfo.ip`` is an IP address,
        distinct per live sandbox. False: it is None.
    ``known_failures``
        Test name (``"test_destroy_leaves_nothing"``) → why this engine fails it
        today, naming the bug. Those tests run as ``xfail(strict=True)``: once the
        bug is fixed they fail until the entry is removed. Keep it empty if you can.
    """

    has_ip: bool
    known_failures: Mapping[str, str]

    def engine(self, home: str = MAIN_HOME) -> AbstractAsyncContextManager[Engine]:
        """A new engine instance; leaving the block calls its ``close()`` (never destroy).

        Engines opened with the same ``home`` share all host state (data directory,
        network, containers, ...), as a daemon and its restarted self do: one can
        ``import_state`` what another exported, and what one made and another does
        not know is an orphan to that other one. Different homes are separate
        installations: nothing done in one (``cleanup_orphans``!) may touch the
        sandboxes of another. The suite uses :data:`MAIN_HOME` and
        :data:`RESTART_HOME`.
        """
        ...

    def spec(self, sandbox_id: str, **overrides: Any) -> SandboxSpec:
        """A spec this engine can create, named ``sandbox_id`` unless ``name`` is
        overridden: image, memory, ``engine`` and ``runtime`` chosen by the kit (small
        and fast), any ``SandboxSpec`` field replaced by ``overrides``."""
        ...

    def workdir(self, engine: Engine, sandbox_id: str) -> str:
        """The absolute directory the sandbox's commands start in (relative paths
        given to its agent resolve against it), known before the sandbox exists: the
        suite puts spec files below it. A VM or container: ``/workspace``."""
        ...

    async def kill_machine(self, engine: Engine, sandbox_id: str) -> None:
        """Kill the sandbox's machine from outside, as a crash would (SIGKILL its QEMU,
        ``docker kill`` its container); return once it is dead. Do not tell the engine."""
        ...

    async def lose_disk(self, engine: Engine, sandbox_id: str) -> None:
        """After :meth:`kill_machine`: make the sandbox's disk unusable from outside, as
        a lost disk would (delete its root file system image, its container, the
        directory of its files). Do not tell the engine."""
        ...

    async def leftovers(self, engine: Engine, sandbox_id: str) -> list[str] | None:
        """What of the sandbox exists on the host, one line each (processes, network
        devices, directories, containers, its address still allocated); ``[]``: nothing.

        Look at the host, not only at the engine's memory: the suite asks after
        ``destroy`` and after another engine instance's ``cleanup_orphans``. None:
        this kit cannot tell; the suite then skips the checks that need it, saying so.
        """
        ...
