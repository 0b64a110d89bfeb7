"""Package-list definitions: parsing the YAML, the checks and their messages, the digest
and reference, the tier a definition makes (and the base key it moves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.images import TIERS
from kiln.images.definition import (
    Definition,
    FileSpec,
    InvalidDefinition,
    from_json,
    image_ref,
    load_yaml_file,
    parse_yaml,
)
from kiln.images.errors import UnknownTier
from kiln.images.registry import register, registered, resolve_tier, tier_of, unregister

JQ_YAML = Path(__file__).parent / "data" / "jq.yaml"


def test_the_test_image_definition_parses() -> None:
    d = load_yaml_file(JQ_YAML)
    assert d.name == "kiln-test-jq" and d.packages == ("jq",)
    assert [f.path for f in d.files] == ["/etc/kiln-test/greeting", "/usr/local/bin/kiln-hello"]
    assert d.files[1].mode == 0o755 and d.files[0].mode == 0o644
    assert d.files[1].content.startswith("#!/bin/sh\n")
    assert d.env == (("KILN_TEST_IMAGE", "jq"),)


def test_sources_are_read_relative_to_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "motd").write_text("hi\n")
    path = tmp_path / "img.yaml"
    path.write_text("name: x\nfiles:\n  - {path: /etc/motd, source: conf/motd, mode: 0600}\n")
    d = load_yaml_file(path)
    assert d.files == (FileSpec("/etc/motd", "hi\n", 0o600),)  # YAML 0600 is octal
    assert load_yaml_file(path, name="renamed").name == "renamed"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- a list", "must be a mapping"),
        ("name: [unclosed", "not valid YAML"),
        ("name: x\ncolour: red", "unknown field(s) colour"),
        ("name: 1x", "name: '1x' is not an image name"),
        ("name: a--b", "not an image name"),
        ("name: x\npackages: jq", "packages: must be a list"),
        ("name: x\npackages: [JQ]", "packages[0]: 'JQ' is not a Debian package name"),
        ("name: x\nfiles: [{path: /a}]", "give exactly one of content and source"),
        ("name: x\nfiles: [{path: /a, content: x, source: y}]", "exactly one"),
        ("name: x\nfiles: [{path: a, content: x}]", "files[0].path: must be an absolute path"),
        ("name: x\nfiles: [{path: /a/../b, content: x}]", "must not contain '.', '..'"),
        ("name: x\nfiles: [{path: /a/, content: x}]", "names a directory"),
        ("name: x\nfiles: [{path: /dev/sda, content: x}]", "files under /dev are not allowed"),
        ("name: x\nfiles: [{path: /usr/lib/kiln/agent.pyz, content: x}]", "/usr/lib/kiln"),
        ("name: x\nfiles: [{path: /a, content: x, mode: rwx}]", "files[0].mode: 'rwx'"),
        ("name: x\nfiles: [{path: /a, content: x, mode: 99999}]", "out of range"),
        ("name: x\nfiles: [{path: /a, content: 7}]", "content: must be text"),
        ("name: x\nfiles: [{path: /a, content: x}, {path: /a, content: y}]", "listed twice"),
        ("name: x\nfiles: [{path: /a, source: nope}]", "files[0].source: cannot read"),
        ("name: x\nfiles: [{path: /a, content: x, owner: me}]", "unknown field(s) owner"),
        ("name: x\nenv: [A]", "env: must be a mapping"),
        ("name: x\nenv: {1A: x}", "env: '1A' is not a variable name"),
        ("name: x\nenv: {A: 1}", "env.A: must be text"),
    ],
)
def test_mistakes_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(InvalidDefinition) as raised:
        parse_yaml(text, base_dir=tmp_path)
    assert needle in str(raised.value)


def test_a_source_needs_a_file_to_be_read_from() -> None:
    with pytest.raises(InvalidDefinition, match="only a YAML file may name a source"):
        from_json({"name": "x", "files": [{"path": "/a", "source": "b"}]})


def test_the_digest_covers_contents_not_the_name_nor_the_order() -> None:
    a = from_json({"name": "a", "packages": ["jq", "tree"]})
    assert a.digest() == from_json({"name": "b", "packages": ["tree", "jq", "jq"]}).digest()
    assert a.digest() != from_json({"name": "a", "packages": ["jq"]}).digest()
    with_file = from_json({"name": "a", "files": [{"path": "/x", "content": "1"}]})
    other_mode = from_json({"name": "a", "files": [{"path": "/x", "content": "1", "mode": "0755"}]})
    assert with_file.digest() != other_mode.digest()
    assert from_json(a.to_json()) == a  # what the store and the registry keep
    with_env = from_json({"name": "a", "packages": ["jq", "tree"], "env": {"A": "1"}})
    assert with_env.digest() != a.digest()
    # The environment is the daemon's to apply: the tree (and its base key) is the same.
    assert tier_of(with_env, "r").base.key() == tier_of(a, "r").base.key()


def test_references_are_per_owner_and_valid_docker_repositories() -> None:
    d = Definition(name="node", packages=("nodejs",))
    assert image_ref(d, None) == f"node.{d.digest()[:12]}"
    assert image_ref(d, "u-0a1b2c3d4e5f") == f"u-0a1b2c3d4e5f.node.{d.digest()[:12]}"
    assert image_ref(Definition(name="node", packages=("npm",)), None) != image_ref(d, None)


def test_a_definition_is_minimal_plus_its_packages_and_files() -> None:
    minimal = TIERS["minimal"]
    d = load_yaml_file(JQ_YAML)
    tier = tier_of(d, "r")
    assert tier.base.packages == (*minimal.base.packages, "jq")
    assert tier.base.files == tuple((f.path, f.content, f.mode) for f in d.files)
    assert (tier.kernel_metapackage, tier.modules) == (minimal.kernel_metapackage, minimal.modules)
    # Files move the base key; a tier without files keeps the key it always had.
    plain = tier_of(Definition(name="x", packages=("jq",)), "r")
    assert len({tier.base.key(), plain.base.key(), minimal.base.key()}) == 3
    assert "files" not in repr(minimal.base.key())


def test_the_registry_resolves_references_like_tiers(tmp_path: Path) -> None:
    d = load_yaml_file(JQ_YAML)
    ref = image_ref(d, None)
    with pytest.raises(UnknownTier):
        resolve_tier(ref, tmp_path)
    register(tmp_path, ref, d)
    assert registered(tmp_path, ref) == d
    assert resolve_tier(ref, tmp_path) == tier_of(d, ref)
    assert resolve_tier("minimal", tmp_path) is TIERS["minimal"]
    unregister(tmp_path, ref)
    with pytest.raises(UnknownTier):
        resolve_tier(ref, tmp_path)
    for bad in ("../x", "a/b", "UPPER", "x..y"):
        with pytest.raises(UnknownTier):
            resolve_tier(bad, tmp_path)


def test_a_dockerfile_definition_is_keyed_by_its_text_context_and_base() -> None:
    sha = "ab" * 32
    doc = {"name": "df", "dockerfile": "FROM minimal\nRUN true\n", "context_sha256": sha}
    definition = from_json(doc)
    assert definition.kind == "dockerfile"
    # Its env comes from its ENV (filled in by the build): not part of what it is.
    with_env = from_json({**doc, "env": {"A": "1"}})
    assert with_env.digest() == definition.digest()
    assert from_json(with_env.to_json()) == with_env
    # So do its default user and directory (its final USER and WORKDIR).
    filled = from_json({**doc, "user": "builder", "workdir": "/opt/app"})
    assert (filled.user, filled.workdir) == ("builder", "/opt/app")
    assert filled.digest() == definition.digest()
    assert from_json(filled.to_json()) == filled
    assert from_json({**doc, "context_sha256": "cd" * 32}).digest() != definition.digest()
    assert from_json({**doc, "dockerfile": "FROM minimal\n"}).digest() != definition.digest()
    # Registered under its digest: the tier's base is the tree dockerd exported.
    tier = tier_of(definition, image_ref(definition, None))
    assert tier.base.key() == definition.digest()


@pytest.mark.parametrize(
    ("doc", "complaint"),
    [
        ({"dockerfile": "FROM minimal\n"}, "context_sha256"),
        ({"dockerfile": "FROM minimal\n", "context_sha256": "xyz"}, "context_sha256"),
        ({"dockerfile": "", "context_sha256": "ab" * 32}, "dockerfile: must be"),
        ({"dockerfile": "FROM minimal\n", "context_sha256": "ab" * 32, "packages": ["jq"]},
         "no packages or files"),
        ({"context_sha256": "ab" * 32}, "only a Dockerfile"),
        ({"workdir": "/opt/app"}, "workdir: only a Dockerfile"),
        ({"dockerfile": "FROM minimal\n", "context_sha256": "ab" * 32, "workdir": "opt"},
         "workdir: 'opt' is not an absolute path"),
        ({"dockerfile": "FROM minimal\n", "context_sha256": "ab" * 32, "workdir": "/a/../b"},
         "not an absolute path"),
    ],
)  # fmt: skip
def test_bad_dockerfile_definitions(doc: dict[str, Any], complaint: str) -> None:
    with pytest.raises(InvalidDefinition, match=complaint):
        from_json({"name": "df", **doc})
