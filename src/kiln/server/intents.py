"""Creates and destroys that a daemon crash interrupted, finished at the next start.

A create writes a sandbox row first and then has the engine make the machine;
a destroy has the engine remove the machine and then deletes the row. A crash
between the two leaves a row that recovery cannot make usable: a create the
user never saw succeed, listed as ``unknown``; or a half-destroyed sandbox
whose disk is gone. So each of them first writes an *intent* file
(``<data_dir>/intents/<sandbox id>.json``, written atomically and fsynced,
~1 ms) and removes it once the operation has its final answer; at the next
start, after recovery and orphan cleanup, :func:`finish_interrupted` carries
every intent left over to a clean end:

- ``create``: undone -- the engine's sandbox destroyed, the row deleted, the
  volumes made for it deleted (row and data). The user was never told it
  existed; a retry makes a new one.
- ``destroy``: completed. The user asked for it and may have lost some of it
  already; it cannot be half there.
- ``save`` (keyed by the saved image's id, not a sandbox's): the engine's files
  of an image the store has no row for are deleted; nobody was told it exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kiln.engine.base import Engine
from kiln.engine.errors import EngineError, SandboxNotFound
from kiln.engine.router import Engines, Unavailable
from kiln.store import NotFound, Store, StoreError

log = logging.getLogger("kiln.intents")

INTENTS_DIR = "intents"

Op = Literal["create", "destroy", "save"]
_OPS = ("create", "destroy", "save")


@dataclass(frozen=True, slots=True)
class Intent:
    sandbox_id: str
    op: Op
    user_id: str
    new_volumes: tuple[str, ...] = ()  # names of the volumes a create makes
    engine: str | None = None  # a save's: the engine that holds the image's files


class Intents:
    """The intent files of one data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def begin(self, intent: Intent) -> None:
        """Durably record ``intent`` (replacing the sandbox's previous one)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(intent.sandbox_id)
        tmp = path.with_name(f".{path.name}.tmp")
        data = {
            "sandbox_id": intent.sandbox_id,
            "op": intent.op,
            "user_id": intent.user_id,
            "new_volumes": list(intent.new_volumes),
            "engine": intent.engine,
        }
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)

    def end(self, sandbox_id: str) -> None:
        """The operation has its final answer: nothing to finish after a crash."""
        with contextlib.suppress(FileNotFoundError):
            self._path(sandbox_id).unlink()

    def pending(self) -> list[Intent]:
        out = []
        entries = sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []
        for path in entries:
            try:
                data = json.loads(path.read_text())
                out.append(
                    Intent(
                        sandbox_id=str(data["sandbox_id"]),
                        op=data["op"] if data["op"] in _OPS else "create",
                        user_id=str(data["user_id"]),
                        new_volumes=tuple(str(v) for v in data.get("new_volumes", ())),
                        engine=None if data.get("engine") is None else str(data["engine"]),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Torn by the crash it was meant to survive (os.replace makes that
                # unlikely): without a sandbox id there is nothing to finish.
                log.warning("unreadable intent %s (%s); removing it", path.name, exc)
                path.unlink(missing_ok=True)
        return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def finish_interrupted(store: Store, engine: Engine, intents: Intents) -> list[str]:
    """Carry every leftover intent to its end (see the module docstring); what was done.

    Call after recovery and orphan cleanup, before the API serves: the engine
    then knows every sandbox that survived, including these.
    """
    done = []
    for intent in intents.pending():
        try:
            await _finish(store, engine, intent)
        except (EngineError, StoreError) as exc:
            # Kept for the next start; the sandbox stays as recovery left it.
            log.error("cannot finish the %s of %s: %s", intent.op, intent.sandbox_id, exc)
            continue
        intents.end(intent.sandbox_id)
        what = {"create": "undone", "destroy": "completed"}.get(intent.op, "cleaned up")
        log.warning("interrupted %s of sandbox %s %s", intent.op, intent.sandbox_id, what)
        done.append(f"{intent.op} of {intent.sandbox_id} {what}")
    return done


async def finish_at_start(store: Store, engine: Engine, data_dir: Path) -> None:
    """:func:`finish_interrupted` for the daemon's start (nothing without an engine)."""
    if isinstance(engine, Unavailable):
        return
    await finish_interrupted(store, engine, Intents(data_dir / INTENTS_DIR))


async def _finish(store: Store, engine: Engine, intent: Intent) -> None:
    if intent.op == "save":
        if not store.saved_image_exists(intent.sandbox_id):
            if isinstance(engine, Engines) and intent.engine is not None:
                engine = engine.get(intent.engine)  # the others have none of it
            await engine.delete_saved_image(intent.sandbox_id)
        return
    with contextlib.suppress(SandboxNotFound):
        await engine.destroy(intent.sandbox_id)
    with contextlib.suppress(NotFound):
        store.delete_sandbox(intent.sandbox_id)
    await _delete_volumes(store, engine, intent.user_id, intent.new_volumes)


async def _delete_volumes(store: Store, engine: Engine, user_id: str, names: Sequence[str]) -> None:
    for name in names:
        try:
            vol = store.delete_volume(user_id, name)
        except NotFound:
            continue
        await engine.delete_volume(Path(vol.path).stem)
