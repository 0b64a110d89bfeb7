"""Images from a Dockerfile, built by the session's private dockerd on kiln's real
``minimal`` base (skipped with the reason when kiln.images has none), then run by
the Docker engine and made into the QEMU image by the same final step as every image.

The built tree and image are keyed by the Dockerfile and its context, so a second
run finds them (the build itself is then a few seconds of cached docker steps).
"""

from __future__ import annotations

import io
import secrets
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from kiln.engine.base import SandboxSpec
from kiln.engine.docker import Dockerd
from kiln.engine.docker import dockerfile as df
from kiln.engine.docker.engine import DockerEngine
from kiln.engine.docker.testing import engine_config
from kiln.images import BuildFailed, InvalidDefinition, builder, cache
from kiln.images.buildlog import BuildLog
from kiln.images.definition import Definition, image_ref
from kiln.images.registry import register

from .test_engine import base_tree_missing

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

DATA = Path(__file__).parents[2] / "images" / "data" / "dockerfile"
BRIDGE = "kd-dfile0"
SUBNET = "10.213.63.0/24"


def context_of(directory: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return out.getvalue()


def definition(name: str, text: str, context: bytes) -> Definition:
    return Definition(name=name, dockerfile=text, context_sha256=df.context_sha256(context))


def build(client: Any, name: str, text: str, context: bytes) -> tuple[Definition, str, list[str]]:
    lines: list[str] = []
    wanted = definition(name, text, context)
    ref = image_ref(wanted, None)
    image_dir = cache.default_image_dir()
    with BuildLog.open(image_dir, ref, lines.append) as log:
        built = df.build(client, wanted, context, ref, image_dir=image_dir, log=log)
    return built, ref, lines


@pytest.fixture(scope="module")
def docker_client_with_base(docker_client: Any) -> Any:
    missing = base_tree_missing()
    if missing:
        pytest.skip(missing)
    return docker_client


@pytest.fixture(scope="module")
def built(docker_client_with_base: Any) -> Iterator[tuple[Definition, str]]:
    context = context_of(DATA)
    definition, ref, _ = build(
        docker_client_with_base, "kiln-test-df", (DATA / "Dockerfile").read_text(), context
    )
    register(cache.default_image_dir(), ref, definition)
    yield definition, ref


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DockerEngine]:
    state = tmp_path_factory.mktemp("docker-dockerfile")
    eng = DockerEngine(engine_config(state, dockerd, bridge=BRIDGE, subnet=SUBNET))
    try:
        yield eng
    finally:
        for info in eng.list():
            await eng.destroy(info.sandbox_id)
        await eng.close()


def test_env_and_user_come_from_the_dockerfile(built: tuple[Definition, str]) -> None:
    definition, _ = built
    assert dict(definition.env) == {
        "GREETING": "hello from a Dockerfile",
        "KILN_TEST_DOCKERFILE": "1",
    }
    assert definition.user == "builder"


def test_the_docker_image_is_tagged_for_the_engine(
    built: tuple[Definition, str], docker_client_with_base: Any
) -> None:
    definition, ref = built
    key = definition.digest()
    config = docker_client_with_base.api.inspect_image(f"kiln/{ref}:{key[:16]}")["Config"]
    assert config["Labels"]["kiln.tier"] == ref
    assert config["Labels"]["kiln.base-key"] == key


@pytest.mark.asyncio(loop_scope="module")
async def test_a_docker_sandbox_sees_what_the_dockerfile_did(
    built: tuple[Definition, str], engine: DockerEngine
) -> None:
    definition, ref = built
    spec = SandboxSpec(
        sandbox_id=f"sb-{secrets.token_hex(4)}",
        name="dockerfile",
        image=ref,
        env=dict(definition.env),
        user=definition.user,
        workdir=definition.workdir,
    )
    await engine.create(spec)
    client = await engine.agent(spec.sandbox_id)
    script = (
        "cat /opt/app/hello.txt /opt/app/run-output /home/builder/whoami;"
        " echo $GREETING; id -un; pwd"
    )
    result = await client.exec(["sh", "-c", script])
    assert (result.exit_code, result.stderr) == (0, b"")
    assert result.stdout.decode() == (
        "copied from the context\nbuilt by RUN\nbuilder\n"
        "hello from a Dockerfile\nbuilder\n/opt/app\n"
    )
    # The agent itself runs as root (the image's USER is only the default): root on request.
    as_root = await client.exec(["id", "-un"], user="root")
    assert (as_root.exit_code, as_root.stdout) == (0, b"root\n")
    await engine.destroy(spec.sandbox_id)


def test_the_qemu_image_is_made_from_the_exported_tree(built: tuple[Definition, str]) -> None:
    definition, ref = built
    base = builder.find_base(ref)
    assert base is not None and base.key == definition.digest()
    assert (base.root / "opt/app/run-output").read_text() == "built by RUN\n"
    assert (base.root / "home/builder/whoami").read_text() == "builder\n"
    assert not (base.root / ".dockerenv").exists()
    # The container's own files are kiln's, not dockerd's empty mount points.
    assert (base.root / "etc/hostname").read_text() == "kiln\n"
    image = builder.ensure_image(ref)
    assert image.tier == ref and image.rootfs.stat().st_size >= image.size_bytes > 0


def test_a_failing_run_names_its_step_and_keeps_the_log(docker_client_with_base: Any) -> None:
    text = "FROM kiln/minimal\nENV A=1\nRUN true\nRUN echo about to fail && false\nRUN true\n"
    with pytest.raises(BuildFailed) as failed:
        build(docker_client_with_base, "kiln-test-df-fails", text, df.empty_context())
    message = str(failed.value)
    assert "step 4/5 RUN echo about to fail && false: exit code 1" in message
    assert failed.value.log.exists()
    assert "about to fail" in failed.value.log.read_text()
    assert f"build log: {failed.value.log}" in message


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("FROM debian:bookworm\nRUN true\n", "only FROM minimal"),
        ("RUN true\n", "first instruction must be FROM"),
        ("FROM minimal\nRUN true\nFROM alpine AS x\n", "step 3 'FROM alpine AS x'"),
    ],
)
def test_only_kilns_base_may_be_the_from(text: str, complaint: str) -> None:
    with pytest.raises(InvalidDefinition, match=complaint):
        df.check_from(text)


@pytest.mark.parametrize(
    ("tail", "complaint"),
    [
        ("USER 1234\n", "final USER is 1234"),
        ("USER builder:staff\n", "final USER is builder:staff"),
        ("ARG WHO=root\nUSER $WHO\n", "must be written out"),
        ('CMD ["sleep", "1"]\n', "CMD is not used"),
    ],
)
def test_what_sandboxes_would_not_honour_is_refused(
    docker_client_with_base: Any, tail: str, complaint: str
) -> None:
    text = f"FROM minimal\n{tail}"
    with pytest.raises(BuildFailed, match=complaint):
        build(docker_client_with_base, "kiln-test-df-refused", text, df.empty_context())
