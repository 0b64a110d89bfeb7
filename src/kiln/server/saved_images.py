"""Saved images: a sandbox saved (``POST /sandboxes/{id}/save``) as a named image of
its owner, which ``POST /sandboxes {"saved_image": name}`` starts new sandboxes from.

The engine keeps the files (disk, and memory where it can: ``SavedImage.memory``)
under its own data directory, named by the row's id; the store keeps the row
(``saved_images``: name unique per owner, the saved sandbox's shape and config).
Both outlive daemon restarts; only the owner sees, uses or deletes one -- another
user's name is simply not found (404).

A save stores the row after the engine made the image, so a daemon that dies in
between leaves files no row names (the engine's, under ``saved/``), never a row
without files.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import TYPE_CHECKING, Any

from kiln.api.requests import NAME_RE, CreateSandbox, SaveSandbox
from kiln.engine.errors import EngineError
from kiln.engine.router import Engines
from kiln.store import NotFound, SavedImageRecord, User, rfc3339
from kiln.store import Sandbox as SandboxRow

from .errors import ConflictError, NotFoundError, Unprocessable
from .intents import Intent

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("kiln.server")


def new_saved_image_id() -> str:
    return f"si-{secrets.token_hex(6)}"


class SavedImageService:
    def __init__(self, services: Services) -> None:
        self._s = services

    @staticmethod
    def view(row: SavedImageRecord) -> dict[str, Any]:
        return {
            "id": row.id,
            "name": row.name,
            "engine": row.engine,
            "image": row.tier,
            "cpus": row.cpus,
            "memory_mb": row.memory_mb,
            "size_bytes": row.size_bytes,
            "memory": row.memory,
            "source_id": row.source_id,
            "created_at": rfc3339(row.created_at),
        }

    def find(self, user: User, name: str) -> SavedImageRecord:
        """The user's saved image ``name`` (404 for unknown ones and other users')."""
        if not NAME_RE.match(name):
            raise NotFoundError(f"saved image {name!r} not found")
        return self._s.store.get_saved_image(user.id, name)

    def list_for(self, user: User) -> list[dict[str, Any]]:
        return [self.view(r) for r in self._s.store.list_saved_images(user.id)]

    def get(self, user: User, name: str) -> dict[str, Any]:
        return self.view(self.find(user, name))

    async def save(self, user: User, ref: str, body: SaveSandbox) -> dict[str, Any]:
        """Save the user's sandbox ``ref`` as ``body.name``; it goes on running."""
        s = self._s
        sandboxes = s.sandboxes
        src = sandboxes.find(user, ref)
        sandboxes.created(src)
        if src.config.volumes:
            names = ", ".join(m.name for m in src.config.volumes)
            raise ConflictError(
                f"sandbox {src.name!r} has volumes attached ({names}): a volume cannot be"
                " in two sandboxes, so it cannot be saved"
            )
        with contextlib.suppress(NotFound):
            s.store.get_saved_image(user.id, body.name)
            raise ConflictError(f"a saved image named {body.name!r} already exists")
        s.catalog.check_free(user, body.name, saving=True)
        s.store.check_image_quota(user)  # already over: no save (403)
        image_id = new_saved_image_id()
        # A crash before the row is written leaves files nobody could name or delete:
        # the next start deletes them (see kiln.server.intents).
        intents = sandboxes.intents
        intents.begin(Intent(image_id, "save", user.id, engine=src.engine))
        try:
            return await self._save(user, src, body, image_id)
        finally:
            intents.end(image_id)

    async def _save(
        self, user: User, src: SandboxRow, body: SaveSandbox, image_id: str
    ) -> dict[str, Any]:
        s = self._s
        sandboxes = s.sandboxes
        async with sandboxes.lock(src.id):
            s.store.get_sandbox(src.id)  # 404 if deleted while we waited
            try:
                saved = await s.engine.save_image(src.id, image_id)
            finally:
                # The save may have woken the source: record what it is now.
                with contextlib.suppress(NotFound):
                    sandboxes.persist_engine_state(src.id)
        try:
            # Its size is known now: over the quota, it goes again (403).
            s.store.check_image_quota(user, saved.size_bytes)
            row = s.store.create_saved_image(
                user.id,
                body.name,
                image_id=image_id,
                engine=saved.engine,
                tier=saved.image,
                cpus=saved.cpus,
                memory_mb=saved.memory_mb,
                size_bytes=saved.size_bytes,
                memory=saved.memory,
                source_id=src.id,
                config=src.config,
            )
        except BaseException:
            # Over the quota, or another save of the name won the race, or the store failed.
            await self._remove_files(image_id, saved.engine)
            raise
        sandboxes.touch(src.id)
        log.info("sandbox %s saved as %s (%s) for %s", src.id, row.name, row.id, user.name)
        return self.view(row)

    async def delete(self, user: User, name: str) -> None:
        """Only its owner can (another user's is 404); sandboxes made from it go on."""
        if not NAME_RE.match(name):
            raise NotFoundError(f"saved image {name!r} not found")
        row = self._s.store.delete_saved_image(user.id, name)
        await self._remove_files(row.id, row.engine)

    async def _remove_files(self, image_id: str, engine_name: str) -> None:
        engine = self._s.engine
        try:
            if isinstance(engine, Engines):
                # Only the engine that made it has its files: wake no other.
                engine = engine.get(engine_name)
            await engine.delete_saved_image(image_id)
        except EngineError as exc:
            log.warning("saved image %s: deleting its files: %s", image_id, exc)

    def for_create(self, user: User, body: CreateSandbox) -> SavedImageRecord | None:
        """The saved image a create starts from (404 if the user has none of that
        name), after checking the body asks for nothing the image fixes (422)."""
        if body.saved_image is None:
            return None
        row = self.find(user, body.saved_image)
        fixed = {
            "template_id": body.template_id,
            "env": body.env,
            "init": body.init,
            "secrets": body.secrets,
            "volumes": body.volumes,
            "new_volumes": body.new_volumes,
        }
        given = [key for key, value in fixed.items() if value is not None]
        if given:
            raise Unprocessable(
                f"{', '.join(given)}: a sandbox made from a saved image has the saved"
                " sandbox's (and no volumes)"
            )
        shape = {
            "image": (body.image, row.tier),
            "cpus": (body.cpus, row.cpus),
            "memory_mb": (body.memory_mb, row.memory_mb),
            "engine": (body.engine, row.engine),
            "runtime": (body.runtime, row.config.runtime),
        }
        for key, (asked, saved) in shape.items():
            if asked is not None and asked != saved:
                raise Unprocessable(
                    f"{key}: a sandbox made from saved image {row.name!r} has its {key}"
                    f" ({saved!r}), not {asked!r}"
                )
        return row


__all__ = ["SavedImageService", "new_saved_image_id"]
