"""The image catalog behind ``/images``: built-in tiers, global images and each user's own.

An image built from a definition is registered in the image cache under a
reference (:func:`kiln.images.definition.image_ref`) that every engine resolves
the way it resolves a tier; the catalog (the store's ``images`` table) maps a
user's name for it to that reference. :meth:`ImageService.resolve` is the one
place a create's ``image`` becomes a reference: a tier by name, else the
caller's own image, else a global one; another user's image is as unknown as a
name nobody used.

Who owns a build: an admin's is global (owner NULL, visible to everybody, on
nobody's quota); anyone else's is their own and counts against their
``max_image_disk_mb``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import logging
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.api.requests import CreateImage
from kiln.engine.router import Engines
from kiln.images import TIERS, Image, ImageError, UnknownTier, prune_images
from kiln.images.buildlog import BuildLog
from kiln.images.cache import default_image_dir
from kiln.images.child import ensure_image_in_child
from kiln.images.definition import Definition, InvalidDefinition, from_json, image_ref
from kiln.images.registry import register, registered, unregister
from kiln.store import ImageRecord, NotFound, SavedImageRecord, User, rfc3339

from .errors import ConflictError, Forbidden, NotFoundError, Unavailable

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("kiln.server")

KIND_PACKAGES = "packages"
KIND_DOCKERFILE = "dockerfile"
#: The kinds whose definition is registered in the image cache (saved ones are not).
BUILT_KINDS = (KIND_PACKAGES, KIND_DOCKERFILE)


@dataclass(frozen=True, slots=True)
class BuildPlan:
    """A checked ``POST /images``: what to build, under which reference; ``existing``
    when the very same image is already in the catalog; a Dockerfile's context tar."""

    definition: Definition
    ref: str
    existing: ImageRecord | None
    context: bytes = b""


class ImageService:
    def __init__(self, services: Services) -> None:
        self._s = services

    @property
    def image_dir(self) -> Path:
        return self._s.config.image_dir or default_image_dir()

    # --- reading --------------------------------------------------------------------

    def resolve(self, user: User, name: str) -> tuple[str, dict[str, str], str | None, str | None]:
        """The reference engines know ``name`` by, as ``user`` sees it, the
        environment the image gives its sandboxes, their default user (a
        Dockerfile's final USER; None: the image's sandbox user) and their commands'
        default directory (its final WORKDIR; None: /workspace).

        Unknown names (and other users' images) raise :class:`UnknownTier`, the
        error an unknown tier has always given.
        """
        if name in TIERS:
            return name, {}, None, None
        try:
            row = self._s.store.find_image(user.id, name)
        except NotFound:
            known = [*TIERS, *(r.name for r in self._s.store.list_images(user.id))]
            raise UnknownTier(name, sorted(set(known))) from None
        if row.kind in BUILT_KINDS:
            self._reregister(row)
        env = row.definition.get("env") or {}
        default_user = row.definition.get("user")
        workdir = row.definition.get("workdir")
        return (
            row.ref,
            {str(k): str(v) for k, v in env.items()},
            None if default_user is None else str(default_user),
            None if workdir is None else str(workdir),
        )

    def _reregister(self, row: ImageRecord) -> None:
        """The catalog is the record: a definition missing from the image cache (a
        cleaned cache, another image_dir) is registered again, so the engines find
        the image and rebuild what is gone instead of calling the name unknown."""
        if registered(self.image_dir, row.ref) is not None:
            return
        try:
            definition = from_json(row.definition)
        except InvalidDefinition as exc:
            raise ImageError(f"image {row.name!r} has an unusable definition: {exc}") from exc
        register(self.image_dir, row.ref, definition)
        log.warning(
            "image %s (%s): its definition was missing from the image cache", row.name, row.ref
        )

    def list_for(self, user: User) -> list[dict[str, Any]]:
        """Tiers, the global and the caller's own images, and the caller's saved
        sandboxes (``kind: saved``): every name ``image`` on create accepts."""
        tiers = [_tier_view(name) for name in sorted(TIERS)]
        built = [self.view(r) for r in self._s.store.list_images(user.id)]
        saved = [_saved_view(r) for r in self._s.store.list_saved_images(user.id)]
        return tiers + built + saved

    def get(self, user: User, name: str) -> dict[str, Any]:
        if name in TIERS:
            return _tier_view(name)
        saved = self.saved(user, name)
        if saved is not None:
            return _saved_view(saved)
        return self.view(self._find(user, name))

    def saved(self, user: User, name: str) -> SavedImageRecord | None:
        """The caller's sandbox saved under ``name``, if any (their saved images and
        their built ones share one namespace: see :meth:`check_free`)."""
        try:
            return self._s.store.get_saved_image(user.id, name)
        except (NotFound, ValueError):
            return None

    def check_free(self, user: User, name: str, *, saving: bool) -> None:
        """409 when ``name`` would mean two images to ``user``: a saved sandbox and a
        built image (their own or a global one) of one name, or a tier."""
        if name in TIERS:
            raise ConflictError(f"{name!r} is a built-in image tier")
        if saving:
            with contextlib.suppress(NotFound):
                self._s.store.find_image(user.id, name)
                raise ConflictError(f"an image named {name!r} exists: pick another name")
        elif self.saved(user, name) is not None:
            raise ConflictError(f"you saved a sandbox as {name!r}: pick another name")

    def _find(self, user: User, name: str) -> ImageRecord:
        try:
            return self._s.store.find_image(user.id, name)
        except NotFound:
            raise NotFoundError(f"image {name!r} not found") from None

    @staticmethod
    def view(row: ImageRecord) -> dict[str, Any]:
        definition = row.definition
        return {
            "name": row.name,
            "kind": row.kind,
            "scope": "global" if row.owner is None else "user",
            "ref": row.ref,
            "digest": row.digest,
            "size_bytes": row.size_bytes,
            "packages": list(definition.get("packages", [])),
            "files": [str(f.get("path")) for f in definition.get("files", [])],
            "env": dict(definition.get("env") or {}),
            "created_at": rfc3339(row.created_at),
        }

    # --- building -------------------------------------------------------------------

    def prepare(self, user: User, body: CreateImage) -> BuildPlan:
        """Check a build request before anything slow: the definition, its name, the
        quota (:class:`BuildPlan`)."""
        doc = body.model_dump()
        context = _context(doc.pop("context"), doc.get("dockerfile"))
        if doc.get("dockerfile") is None:
            doc.pop("dockerfile")
        else:
            if doc.get("env"):
                raise InvalidDefinition(
                    "env: a Dockerfile image's environment is its ENV instructions'"
                )
            doc["context_sha256"] = hashlib.sha256(context).hexdigest()
        definition = from_json(doc)  # InvalidDefinition: 422
        self.check_free(user, definition.name, saving=False)
        owner = None if user.is_admin else user.id
        ref = image_ref(definition, owner)
        try:
            existing = self._s.store.find_image(user.id, definition.name)
        except NotFound:
            existing = None
        if existing is not None and existing.owner == owner:
            if existing.ref == ref:
                return BuildPlan(definition, ref, existing, context)
            raise ConflictError(
                f"an image named {definition.name!r} already exists with another definition:"
                " delete it first"
            )
        if owner is not None:
            self._s.store.check_image_quota(user)
        if definition.dockerfile is not None:
            from kiln.engine.docker.dockerfile import check_from  # noqa: PLC0415

            check_from(definition.dockerfile)  # another FROM: 422 before anything runs
        return BuildPlan(definition, ref, None, context)

    async def build(
        self,
        user: User,
        plan: BuildPlan,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Build (or find in the cache) the image and add it to the catalog."""
        definition, ref = plan.definition, plan.ref
        owner = None if user.is_admin else user.id
        image_dir = self.image_dir
        try:
            if definition.dockerfile is not None:
                definition = await self._docker_build(plan, progress)
            await asyncio.to_thread(register, image_dir, ref, definition)
            started = time.monotonic()
            image = await ensure_image_in_child(ref, image_dir, progress)
            elapsed = time.monotonic() - started
            log.info("image %s (%s) ready in %.1f s", definition.name, ref, elapsed)
            size = await asyncio.to_thread(_disk_usage, image)
            if owner is not None:
                self._s.store.check_image_quota(user, size)
            row = self._s.store.add_image(
                owner,
                definition.name,
                ref=ref,
                kind=definition.kind,
                digest=image.digest,
                size_bytes=size,
                definition=definition.to_json(),
            )
        except asyncio.CancelledError:
            # Stopped (a client gone, a daemon shutting down): no waiting for the build
            # lock now; a stopped build leaves only temporary files, which the next
            # build removes.
            if not self._s.store.image_ref_exists(ref):
                unregister(image_dir, ref)
            raise
        except Exception:
            # Nothing in the catalog refers to it: no files stay behind (the cached
            # base tree does: it is keyed by content and shared).
            if not self._s.store.image_ref_exists(ref):
                await asyncio.to_thread(_remove_files, image_dir, ref)
            raise
        return self.view(row)

    async def _docker_build(
        self, plan: BuildPlan, progress: Callable[[str], None] | None
    ) -> Definition:
        """The Docker image and the tree of a Dockerfile definition, built by the Docker
        engine's dockerd (:mod:`kiln.engine.docker.dockerfile`); returns the definition
        with the Dockerfile's environment. The tree then goes through the same child
        build as every image (the QEMU image).

        Runs in a thread: unlike the child build, a stopped request lets a running
        ``docker build`` finish (its result is cached for the next request).
        """
        from kiln.engine.docker.dockerfile import build as docker_build  # noqa: PLC0415
        from kiln.engine.docker.engine import DockerEngine  # noqa: PLC0415

        engine = self._s.engine
        docker: object = engine
        if isinstance(engine, Engines):
            docker = engine.get("docker") if "docker" in engine.names else None
        if not isinstance(docker, DockerEngine):
            raise Unavailable("a Dockerfile image needs the docker engine, which is not enabled")
        client = await docker.docker_client()
        loop = asyncio.get_running_loop()

        def report(message: str) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, message)

        def run() -> Definition:
            with BuildLog.open(self.image_dir, plan.ref, report) as log:
                return docker_build(
                    client,
                    plan.definition,
                    plan.context,
                    plan.ref,
                    image_dir=self.image_dir,
                    log=log,
                )

        return await asyncio.to_thread(run)

    # --- deleting -------------------------------------------------------------------

    def as_owner(self, user: User, owner: str | None) -> User:
        """Whose images a call is about: ``user`` themselves, or (admins only) the user
        named ``owner`` (by id or name), for an admin to act on a user's image."""
        if owner is None or owner in (user.id, user.name):
            return user
        if not user.is_admin:
            raise Forbidden("only an admin may act on another user's images")
        try:
            return self._s.store.get_user(owner)
        except NotFound:
            try:
                return self._s.store.user_by_name(owner)
            except NotFound:
                raise NotFoundError(f"user {owner!r} not found") from None

    async def delete(self, user: User, name: str, owner: str | None = None) -> None:
        """Remove an image: its owner or an admin (global ones: admins only; a user's,
        for an admin: ``owner``); 409 while a live sandbox runs it. The cached base
        tree stays (keyed by content, shared)."""
        if name in TIERS:
            raise Forbidden(f"{name!r} is a built-in image tier")
        whose = self.as_owner(user, owner)
        if whose is user and self.saved(user, name) is not None:
            await self._s.saved_images.delete(user, name)
            return
        row = self._find(whose, name)
        if row.owner is None and not user.is_admin:
            raise Forbidden(f"image {name!r} is global: only an admin may delete it")
        self._s.store.delete_image(row.id)
        if row.kind in BUILT_KINDS:
            await asyncio.to_thread(_remove_files, self.image_dir, row.ref)


def _context(value: str | None, dockerfile: str | None) -> bytes:
    """A Dockerfile's build context from its base64 (an empty tar when there is none)."""
    from kiln.engine.docker.dockerfile import empty_context  # noqa: PLC0415

    if value is None:
        return empty_context() if dockerfile is not None else b""
    if dockerfile is None:
        raise InvalidDefinition("context: only a Dockerfile image has a build context")
    try:
        context = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidDefinition("context: not base64 (of a tar archive)") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(context)) as tar:
            tar.getmembers()
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidDefinition(f"context: not a tar archive: {exc}") from None
    return context


def _tier_view(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "tier",
        "scope": "builtin",
        "ref": name,
        "packages": list(TIERS[name].base.packages),
    }


def _saved_view(row: SavedImageRecord) -> dict[str, Any]:
    return {
        "name": row.name,
        "kind": "saved",
        "scope": "user",
        "ref": row.tier,
        "digest": row.id,
        "size_bytes": row.size_bytes,
        "env": dict(row.config.env),
        "created_at": rfc3339(row.created_at),
    }


def _disk_usage(image: Image) -> int:
    """Bytes the image's files occupy on the host (its rootfs is sparse)."""
    total = 0
    for path in (image.rootfs, image.initrd, image.kernel):
        total += os.stat(path).st_blocks * 512
    return total


def _remove_files(image_dir: Path, ref: str) -> None:
    unregister(image_dir, ref)
    for removed in prune_images(ref, image_dir, keep=0):
        log.info("removed image files %s", removed)
