"""The engine conformance suite: one set of tests that every engine (QEMU, Docker, the
fake) must pass, as trio's ``check_two_way_stream`` is for its streams.

Plugging an engine in takes a test module with a ``kit`` fixture and a subclass::

    # tests/engine/test_conformance_docker.py
    from kiln.engine.testing import MAIN_HOME, EngineConformance

    class DockerKit:                                   # an EngineKit
        has_ip = True
        known_failures: dict[str, str] = {}

        @contextlib.asynccontextmanager
        async def engine(self, home=MAIN_HOME):        # one installation per home
            engine = DockerEngine(self.config(home))
            try:
                yield engine
            finally:
                await engine.close()

        def spec(self, sandbox_id, **overrides):
            return SandboxSpec(**{"sandbox_id": sandbox_id, "name": sandbox_id,
                                  "engine": "docker", "runtime": "runc", **overrides})

        def workdir(self, engine, sandbox_id):
            return "/workspace"

        async def kill_machine(self, engine, sandbox_id): ...   # docker kill, from outside
        async def lose_disk(self, engine, sandbox_id): ...      # docker rm, from outside
        async def leftovers(self, engine, sandbox_id): ...      # containers, veths, dirs

    @pytest.fixture(scope="module")
    def kit(...):
        yield DockerKit(...)                           # and clean its homes up after

    class TestDockerConformance(EngineConformance):
        pass

:class:`EngineKit` (:mod:`.kit`) says exactly what each member must do;
:class:`EngineConformance` (:mod:`.suite`) lists what is tested and how. The
suite's async fixtures are class-scoped and everything runs in the module's
event loop (pytest-asyncio ``loop_scope="module"``), so the kit fixture should
be module-scoped, and an async one must use ``loop_scope="module"`` too. One
module can hold several subclasses (Docker on runc and on runsc, say) with the
``kit`` fixture parametrized or overridden per class; each class gets its own
engine and sandboxes. Give the module a ``pytest.mark.timeout`` that fits a
class's worth of boots.
"""

import pytest

# The suite's plain asserts get pytest's explanations, as in a test module.
pytest.register_assert_rewrite("kiln.engine.testing.suite")

from .kit import MAIN_HOME, RESTART_HOME, EngineKit  # noqa: E402
from .suite import EngineConformance, Sandbox  # noqa: E402

__all__ = ["MAIN_HOME", "RESTART_HOME", "EngineConformance", "EngineKit", "Sandbox"]
