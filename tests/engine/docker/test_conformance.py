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

#: Each variant's first subnet (10.213.N.0/24; one more per extra home). "runc-pool":
#: runc with a warm pool of the suite's shape (tests/engine/docker/test_pool.py).
FIRST_SUBNET = {"runc": 62, "runsc": 66, "runc-pool": 74}
#: The pooled variant's creates that must have come from the pool (11 valid ones fit).
MIN_CLAIMS = 9


@pytest.fixture(scope="module", params=sorted(FIRST_SUBNET))
def kit(
    request: pytest.FixtureRequest, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerKit]:
    missing = base_tree_missing()
    if missing:
        pytest.skip(missing)
    variant: str = request.param
    runtime, _, pool = variant.partition("-")
    scratch = tmp_path_factory.mktemp(f"conformance-{variant}")
    kit = DockerKit(dockerd, scratch, runtime, FIRST_SUBNET[variant], pool_size=1 if pool else 0)
    yield kit
    if pool:
        assert kit.claims >= MIN_CLAIMS, f"only {kit.claims} creates came from the pool"


class TestDockerEngineConformance(EngineConformance):
    pass
