"""The engine conformance suite against the Docker engine, on runc and on gVisor's runsc,
with kiln's real rootfs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiln.engine.docker import Dockerd
from kiln.engine.testing import EngineConformance

from .kit import DockerKit
from .test_engine import base_tree_missing

pytestmark = [pytest.mark.timeout(300)]

#: Each runtime's first subnet (10.213.N.0/24; one more per extra home).
FIRST_SUBNET = {"runc": 62, "runsc": 66}


@pytest.fixture(scope="module", params=sorted(FIRST_SUBNET))
def kit(
    request: pytest.FixtureRequest, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerKit]:
    missing = base_tree_missing()
    if missing:
        pytest.skip(missing)
    runtime: str = request.param
    scratch = tmp_path_factory.mktemp(f"conformance-{runtime}")
    yield DockerKit(dockerd, scratch, runtime, FIRST_SUBNET[runtime])


class TestDockerEngineConformance(EngineConformance):
    pass
