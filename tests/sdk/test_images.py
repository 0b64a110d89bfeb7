"""``kiln.images`` in both SDK clients against a real daemon: the catalog, a build with
streamed progress and without, and the errors as exceptions.

The build reuses the base tree of ``tests/images/data/jq.yaml`` (built before the
suite), so it runs only the fast step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.images.definition import load_yaml_file
from kiln.sdk import AsyncKiln, Conflict, Kiln, NotFound, PermissionDenied, ValidationError

from .conftest import unique

pytestmark = pytest.mark.timeout(300)

JQ = load_yaml_file(Path(__file__).parents[1] / "images" / "data" / "jq.yaml")
FILES = [f.to_json() for f in JQ.files]


def test_build_list_get_delete_with_progress(kiln: Kiln) -> None:
    name = unique("sdk")
    lines: list[str] = []
    built = kiln.images.build(
        name, packages=JQ.packages, files=FILES, env=dict(JQ.env), progress=lines.append
    )
    assert (built.name, built.kind, built.scope) == (name, "packages", "user")
    assert any(line.startswith("[image] mkfs.ext4") for line in lines), lines
    assert built.env == {"KILN_TEST_IMAGE": "jq"}
    # Without progress: the plain answer (200 now: the same image exists).
    assert kiln.images.build(name, packages=JQ.packages, files=FILES, env=dict(JQ.env)) == built
    with pytest.raises(Conflict, match="delete it first"):
        kiln.images.build(name, packages=["tree"])
    assert [i.name for i in kiln.images.list()][:1] == ["minimal"]
    assert kiln.images.get(name) == built
    kiln.images.delete(name)
    with pytest.raises(NotFound):
        kiln.images.get(name)


async def test_errors_are_exceptions(akiln: AsyncKiln) -> None:
    assert (await akiln.images.get("minimal")).kind == "tier"
    with pytest.raises(ValidationError, match=r"packages\[0\]"):
        await akiln.images.build("x", packages=["NOT VALID"])
    with pytest.raises(ValidationError, match=r"files\[0\]\.path"):
        await akiln.images.build("x", files=[{"path": "/proc/x", "content": ""}])
    with pytest.raises(PermissionDenied, match="built-in"):
        await akiln.images.delete("minimal")
    with pytest.raises(NotFound):
        await akiln.images.delete("nope")
    with pytest.raises(PermissionDenied, match="only an admin"):
        await akiln.images.get("x", owner="someone-else")
