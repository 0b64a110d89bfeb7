"""Where the images of user definitions are registered: ``<image dir>/defs/<ref>.json``.

A built-in tier is a constant (:data:`kiln.images.tiers.TIERS`); an image made
from a :class:`~kiln.images.definition.Definition` is a tier too, described by a
file in the image cache, so every engine finds it by the same name the same way
(:func:`resolve_tier`): the QEMU engine's child build, the Docker engine's
import of the base tree, the daemon's image builder. A definition adds its
packages and files to the ``minimal`` tier's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import cache
from .definition import Definition, InvalidDefinition, from_json
from .errors import ImageError, UnknownTier
from .rootfs import BaseSpec
from .tiers import TIERS, Tier

DEFS_DIR = "defs"
#: The tier a definition builds on.
PARENT_TIER = "minimal"
_REF_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,120}$")


def _def_path(image_dir: Path, ref: str) -> Path:
    if not _REF_RE.match(ref) or ".." in ref:
        raise UnknownTier(ref, list(TIERS))
    return image_dir / DEFS_DIR / f"{ref}.json"


def tier_of(definition: Definition, ref: str) -> Tier:
    """The tier ``ref`` of a definition: the parent tier plus its packages and files."""
    parent = TIERS[PARENT_TIER]
    if definition.dockerfile is not None:
        # Its tree is dockerd's export (kiln.engine.docker.dockerfile), keyed by its digest.
        return Tier(
            name=ref,
            base=BaseSpec(
                suite=parent.base.suite,
                variant=parent.base.variant,
                packages=parent.base.packages,
                prebuilt=definition.digest(),
            ),
            kernel_metapackage=parent.kernel_metapackage,
            modules=parent.modules,
            min_rootfs_size=parent.min_rootfs_size,
        )
    packages = tuple(dict.fromkeys((*parent.base.packages, *definition.packages)))
    files = tuple((f.path, f.content, f.mode) for f in definition.files)
    return Tier(
        name=ref,
        base=BaseSpec(
            suite=parent.base.suite,
            variant=parent.base.variant,
            packages=packages,
            files=files,
        ),
        kernel_metapackage=parent.kernel_metapackage,
        modules=parent.modules,
        min_rootfs_size=parent.min_rootfs_size,
    )


def register(image_dir: Path, ref: str, definition: Definition) -> Path:
    """Record ``definition`` under ``ref`` (atomically; the same ref always has the same
    content, see :func:`~kiln.images.definition.image_ref`)."""
    if ref in TIERS:
        raise ImageError(f"{ref!r} is a built-in tier")
    path = _def_path(image_dir, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    cache.write_manifest(tmp, definition.to_json())
    os.replace(tmp, path)
    return path


def unregister(image_dir: Path, ref: str) -> None:
    _def_path(image_dir, ref).unlink(missing_ok=True)


def registered(image_dir: Path, ref: str) -> Definition | None:
    doc = cache.read_manifest(_def_path(image_dir, ref))
    if doc is None:
        return None
    try:
        return from_json(doc)
    except InvalidDefinition:
        return None


def resolve_tier(name: str, image_dir: Path) -> Tier:
    """A built-in tier, or the registered definition ``name``; else :class:`UnknownTier`."""
    if name in TIERS:
        return TIERS[name]
    definition = registered(image_dir, name)
    if definition is None:
        raise UnknownTier(name, list(TIERS))
    return tier_of(definition, name)


def is_known(name: str, image_dir: Path) -> bool:
    try:
        resolve_tier(name, image_dir)
    except ImageError:
        return False
    return True


def registered_refs(image_dir: Path) -> list[str]:
    parent = image_dir / DEFS_DIR
    if not parent.is_dir():
        return []
    return sorted(p.stem for p in parent.glob("*.json") if not p.name.startswith("."))


def load_json_text(text: str) -> Definition:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidDefinition(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidDefinition("the definition must be an object")
    return from_json(doc)
