"""The engine conformance suite against the Docker engine with gVisor's runsc (kiln's rootfs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiln.engine.docker import Dockerd
from kiln.engine.testing import EngineConformance

from .kit import DockerKit
from .test_engine import base_tree_missing

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def kit(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerKit]:
    missing = base_tree_missing()
    if missing:
        pytest.skip(missing)
    yield DockerKit(dockerd, tmp_path_factory.mktemp("conformance-runsc"), "runsc", 66)


class TestDockerRunscConformance(EngineConformance):
    pass
