"""The daemon's store: users, sandboxes, templates, secrets, volumes, publish rules.

On SQLite (the embedded default, :mod:`.sqlite_backend`) or PostgreSQL (several
daemons sharing one database, :mod:`.postgres_backend`): every query is written
once here, what differs sits behind :class:`~kiln.store.backend.Backend`.

One connection, guarded by a lock, in autocommit mode; every mutation is one
explicit write transaction (``BEGIN IMMEDIATE`` on SQLite; ``BEGIN`` and an
advisory lock on PostgreSQL), so the checks it makes still hold when it
commits, and a row is either fully written or absent after a crash.

Every call is synchronous and typically well under a millisecond on SQLite (a
few loopback round trips on PostgreSQL), so asyncio code calls it directly; it
is also safe from other threads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import Enum
from typing import Any, Concatenate, Final, ParamSpec, Self, TypeVar

from kiln.engine.base import Status, Thermal
from kiln.engine.states import CREATED

from .backend import Backend, Connection, Cursor, RetryableConflict, is_postgres_url
from .errors import (
    Conflict,
    ImageInUse,
    InvalidValue,
    NameTaken,
    NotFound,
    QuotaExceeded,
    SchemaError,
    SecretKeyError,
    StoreError,
    UserHasSandboxes,
    VolumeInUse,
)
from .records import (
    ImageRecord,
    NewVolume,
    Node,
    NodeLoad,
    NodeState,
    NodeUsage,
    OnExpire,
    PublishRule,
    Quotas,
    Sandbox,
    SandboxConfig,
    SavedImageRecord,
    SecretInfo,
    Template,
    TemplateSpec,
    User,
    Volume,
    as_bool,
    as_int,
    as_opt_int,
    config_from_json,
    config_to_json,
    engine_state_from_json,
    engine_state_to_json,
    labels_from_json,
    labels_match,
    labels_to_json,
    template_spec_from_json,
    template_spec_to_json,
)
from .schema import schema_version
from .secretbox import SecretBox

API_KEY_PREFIX: Final = "kiln_"
DEFAULT_BUSY_TIMEOUT_MS: Final = 5000
#: Attempts at a write that collided with another transaction (PostgreSQL only).
WRITE_ATTEMPTS: Final = 4

#: A row: ``row["column"]`` or ``row[0]`` (``sqlite3.Row``, or psycopg's through
#: :class:`~kiln.store.postgres_backend.PgRow`).
Row = Any

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _retried(
    method: Callable[Concatenate[Store, _P], _R],
) -> Callable[Concatenate[Store, _P], _R]:
    """Run a write method again when its transaction collided with another one
    (PostgreSQL's deadlock or serialization failure; the transaction was rolled
    back, so nothing of the attempt remains). SQLite never raises this."""

    @functools.wraps(method)
    def wrapper(self: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return method(self, *args, **kwargs)
            except RetryableConflict:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


class _Unset(Enum):
    UNSET = 0


UNSET: Final = _Unset.UNSET  # "leave this field alone" where None is a real value


def new_api_key() -> str:
    """A fresh API key: the prefix and 32 random bytes, URL-safe base64."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The only form in which a key is stored (hex SHA-256)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


_SECRET_KEY_SETTING: Final = "secret_key_recipient"

_USER_COLS = (
    "id, name, is_admin, max_sandboxes, max_cpus, max_memory_mb, created_at, max_image_disk_mb"
)
_IMAGE_COLS = "id, owner, name, ref, kind, digest, size_bytes, definition, created_at"
_SANDBOX_COLS = (
    "id, user_id, name, cpus, memory_mb, image, keep_hot, status, thermal, ip, engine,"
    " engine_state, spec, created_at, last_active_at, deleted_at, labels, expires_at, on_expire,"
    " node"
)
_NODE_COLS = (
    "name, address, engines, cpus, memory_mb, disk_mb, load, state, starting, registered_at,"
    " lease_until, starting_cpus, starting_memory_mb"
)
_VOLUME_SELECT = (
    "SELECT v.id, v.user_id, v.name, v.size_mb, v.path, v.created_at, a.sandbox_id, a.mount"
    " FROM volumes v LEFT JOIN volume_attachments a ON a.volume_id = v.id"
)
_RULE_COLS = "id, sandbox_id, port, alias, created_at"
_SAVED_COLS = (
    "id, user_id, name, engine, tier, cpus, memory_mb, size_bytes, memory, source_id, spec,"
    " created_at"
)


class Store:
    """The daemon's persistent state. Open with :meth:`Store.open`; close with :meth:`close`."""

    def __init__(
        self,
        backend: Backend,
        *,
        secret_box: SecretBox | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        """Wrap an already opened and migrated backend (use :meth:`open`)."""
        self._backend = backend
        #: Where the data is: the SQLite file's path or the PostgreSQL URL (no password).
        self.path = backend.location
        self._lock = threading.RLock()
        self._box = secret_box
        self._now = now

    @classmethod
    def open(
        cls,
        target: str | os.PathLike[str],
        *,
        secret_box: SecretBox | None = None,
        now: Callable[[], float] = time.time,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> Self:
        """Open (creating if needed) and migrate the store at ``target``.

        A ``postgresql://`` URL selects PostgreSQL (the database must exist;
        :class:`StoreUnavailable` if the server cannot be reached); anything else
        is a SQLite file path, where a new file is made readable by its owner only
        (it holds key hashes and encrypted secrets) and ``":memory:"`` works for
        throwaway stores. ``busy_timeout_ms``: how long a write waits for another
        writer's lock.
        """
        name = os.fspath(target)
        backend: Backend
        if is_postgres_url(name):
            from .postgres_backend import PostgresBackend  # noqa: PLC0415 -- psycopg only when used

            backend = PostgresBackend.open(name, lock_timeout_ms=busy_timeout_ms)
        else:
            from .sqlite_backend import SqliteBackend  # noqa: PLC0415 -- imports .schema too

            backend = SqliteBackend.open(name, busy_timeout_ms=busy_timeout_ms)
        return cls(backend, secret_box=secret_box, now=now)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._backend.kind

    def close(self) -> None:
        """Close the connection (idempotent). Further calls raise :class:`StoreError`."""
        with self._lock:
            self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- transactions -----------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock, self._translated():
            yield self._backend.connection()

    @contextlib.contextmanager
    def _write(self, owner: str | None = None, *, row_locks: bool = False) -> Iterator[Connection]:
        """One transaction: committed if the block returns, rolled back if it raises.

        ``owner``: the user whose rows alone the block's checks read, which lets
        PostgreSQL run writes for different users at once (see
        :mod:`.postgres_backend`); ``None`` when the checks span users.
        ``row_locks``: the block locks the rows it checks (``FOR UPDATE``) instead.
        """
        backend = self._backend
        with self._lock, self._translated():
            conn = backend.connection()
            backend.begin(conn, owner, row_locks=row_locks)
            try:
                yield conn
                backend.commit(conn)
            except BaseException:
                backend.rollback(conn)
                raise

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """The driver's exceptions → the store's, in one place."""
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            translated = self._backend.translate(exc)
            if translated is None:
                raise
            raise translated from exc

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return schema_version(conn, self._backend.schema)

    def integrity_check(self) -> list[str]:
        """The database's own checks (SQLite: integrity and foreign keys; PostgreSQL:
        unvalidated constraints, page checksum failures); empty means healthy."""
        with self._read() as conn:
            return self._backend.integrity_check(conn)

    # --- users --------------------------------------------------------------------------

    @_retried
    def create_user(
        self, name: str, *, admin: bool = False, quotas: Quotas | None = None
    ) -> tuple[User, str]:
        """Create a user; return it and its API key (the only time the key is visible)."""
        quotas = _checked_quotas(quotas or Quotas())
        key = new_api_key()
        user = User(_new_id("u"), name, bool(admin), quotas, self._now())
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise NameTaken(f"user {name!r} already exists")
            conn.execute(
                f"INSERT INTO users ({_USER_COLS}, key_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user.id,
                    user.name,
                    int(user.is_admin),
                    quotas.max_sandboxes,
                    quotas.max_cpus,
                    quotas.max_memory_mb,
                    user.created_at,
                    quotas.max_image_disk_mb,
                    hash_api_key(key),
                ),
            )
        return user, key

    def get_user(self, user_id: str) -> User:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,))
            return _user(_one(row, f"user {user_id!r}"))

    def user_by_name(self, name: str) -> User:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE name = ?", (name,))
            return _user(_one(row, f"user {name!r}"))

    def user_by_key(self, key: str) -> User | None:
        """The user owning API key ``key``, or ``None``.

        Only the key's hash is compared, so the lookup reveals nothing about
        stored keys through timing.
        """
        if not key.startswith(API_KEY_PREFIX):
            return None
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_USER_COLS} FROM users WHERE key_hash = ?", (hash_api_key(key),)
            ).fetchone()
            return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._read() as conn:
            return [_user(r) for r in conn.execute(f"SELECT {_USER_COLS} FROM users ORDER BY name")]

    @_retried
    def rotate_key(self, user_id: str) -> str:
        """Replace a user's API key; the old one stops working at once."""
        key = new_api_key()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE users SET key_hash = ? WHERE id = ?", (hash_api_key(key), user_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"user {user_id!r} not found")
        return key

    @_retried
    def set_quotas(self, user_id: str, quotas: Quotas) -> User:
        quotas = _checked_quotas(quotas)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE users SET max_sandboxes = ?, max_cpus = ?, max_memory_mb = ?,"
                " max_image_disk_mb = ? WHERE id = ?",
                (
                    quotas.max_sandboxes,
                    quotas.max_cpus,
                    quotas.max_memory_mb,
                    quotas.max_image_disk_mb,
                    user_id,
                ),
            )
            if cur.rowcount == 0:
                raise NotFound(f"user {user_id!r} not found")
            row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,))
            return _user(_one(row, f"user {user_id!r}"))

    @_retried
    def delete_user(self, user_id: str) -> None:
        """Delete a user with their templates, secrets, volume rows and sandbox history.

        Refused (:class:`UserHasSandboxes`) while they have live sandboxes: destroy
        those through the engine first. Volume files on disk are the caller's to
        remove (list them first).
        """
        with self._write(owner=user_id) as conn:
            if not conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone():
                raise NotFound(f"user {user_id!r} not found")
            live = _count_live(conn, user_id)
            if live:
                raise UserHasSandboxes(f"user {user_id!r} still has {live} live sandbox(es)")
            conn.execute("DELETE FROM users WHERE id = ?", (user_id,))

    # --- quotas -------------------------------------------------------------------------

    def check_quota(self, user: User, cpus: int, memory_mb: int) -> None:
        """Raise :class:`QuotaExceeded` if ``user`` may not create such a sandbox now."""
        with self._read() as conn:
            _check_quota(conn, user.quotas, cpus, memory_mb, _count_live(conn, user.id))

    # --- sandboxes ----------------------------------------------------------------------

    @_retried
    def create_sandbox(
        self,
        user_id: str,
        *,
        image: str,
        engine: str,
        name: str | None = None,
        cpus: int = 1,
        memory_mb: int = 512,
        keep_hot: bool = False,
        config: SandboxConfig | None = None,
        new_volumes: Sequence[NewVolume] = (),
        status: Status = CREATED.next.status,
        thermal: Thermal = CREATED.next.thermal,
        ip: str | None = None,
        engine_state: Mapping[str, Any] | None = None,
        sandbox_id: str | None = None,
        enforce_quota: bool = True,
        labels: Mapping[str, str] | None = None,
        expires_at: float | None = None,
        on_expire: OnExpire = OnExpire.DESTROY,
        node: str | None = None,
    ) -> Sandbox:
        """Insert a sandbox row, in one transaction with everything it needs.

        Creates ``new_volumes``, then attaches every volume in ``config.volumes``
        (new ones must be listed there too, with their mount point). Checks the
        owner's quota against the live sandboxes in the same transaction, so two
        concurrent creates cannot both slip under the limit. The name defaults
        to the id.

        Raises :class:`NotFound` (user or volume), :class:`NameTaken`,
        :class:`VolumeInUse`, :class:`QuotaExceeded`.
        """
        config = config or SandboxConfig()
        sandbox_id = sandbox_id or _new_id("sb")
        name = name or sandbox_id
        cpus, memory_mb = as_int(cpus, "cpus"), as_int(memory_mb, "memory_mb")
        spec_json = config_to_json(config)
        state_json = engine_state_to_json(engine_state)
        labels_json = labels_to_json(labels or {})
        now = self._now()
        with self._write(owner=user_id) as conn:
            user = _user(_one(_select_user(conn, user_id), f"user {user_id!r}"))
            if enforce_quota:
                _check_quota(conn, user.quotas, cpus, memory_mb, _count_live(conn, user_id))
            if _live_sandbox_named(conn, user_id, name) is not None:
                raise NameTaken(f"a sandbox named {name!r} already exists")
            conn.execute(
                f"INSERT INTO sandboxes ({_SANDBOX_COLS}) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                (
                    sandbox_id,
                    user_id,
                    name,
                    cpus,
                    memory_mb,
                    image,
                    int(as_bool(keep_hot, "keep_hot")),
                    Status(status).value,
                    Thermal(thermal).value,
                    ip,
                    engine,
                    state_json,
                    spec_json,
                    now,
                    now,
                    labels_json,
                    _opt_float(expires_at, "expires_at"),
                    OnExpire(on_expire).value,
                    node,
                ),
            )
            for vol in new_volumes:
                _insert_volume(conn, user_id, vol.name, size_mb=vol.size_mb, path=vol.path, now=now)
            for mount in config.volumes:
                _attach(conn, user_id, sandbox_id, mount.name, mount.mount)
            return _sandbox(_one(_select_sandbox(conn, sandbox_id), f"sandbox {sandbox_id!r}"))

    def get_sandbox(self, sandbox_id: str, *, include_deleted: bool = False) -> Sandbox:
        with self._read() as conn:
            sb = _sandbox(_one(_select_sandbox(conn, sandbox_id), f"sandbox {sandbox_id!r}"))
        if not sb.live and not include_deleted:
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return sb

    def find_sandbox(self, user_id: str, id_or_name: str) -> Sandbox:
        """A live sandbox of ``user_id`` by id, else by name (the API addresses both ways)."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE user_id = ? AND id = ?"
                " AND deleted_at IS NULL",
                (user_id, id_or_name),
            ).fetchone() or _live_sandbox_named(conn, user_id, id_or_name)
            return _sandbox(_one_row(row, f"sandbox {id_or_name!r}"))

    def list_sandboxes(
        self, user_id: str, *, labels: Mapping[str, str] | None = None
    ) -> list[Sandbox]:
        """A user's live sandboxes, oldest first; with ``labels``, only those carrying
        every one of them (a user has few sandboxes: filtered here, not in SQL)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE user_id = ? AND deleted_at IS NULL"
                " ORDER BY created_at, id",
                (user_id,),
            )
            found = [_sandbox(r) for r in rows]
        if labels:
            found = [sb for sb in found if labels_match(sb.labels, labels)]
        return found

    def list_expiring(self, *, node: str | _Unset = UNSET) -> list[Sandbox]:
        """Every live sandbox that has an expiry (on ``node``, if given), soonest first."""
        query = f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE deleted_at IS NULL"
        query += " AND expires_at IS NOT NULL"
        args: tuple[str, ...] = ()
        if not isinstance(node, _Unset):
            query += " AND node = ?"
            args = (node,)
        with self._read() as conn:
            return [_sandbox(r) for r in conn.execute(query + " ORDER BY expires_at, id", args)]

    def list_live_sandboxes(
        self, engine: str | None = None, *, node: str | _Unset | None = UNSET
    ) -> list[Sandbox]:
        """Every live sandbox (of one engine, and on one ``node``, if given; ``node=None``:
        those on no node), oldest first."""
        query = f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE deleted_at IS NULL"
        args: tuple[str, ...] = ()
        if engine is not None:
            query += " AND engine = ?"
            args = (engine,)
        if node is None:
            query += " AND node IS NULL"
        elif not isinstance(node, _Unset):
            query += " AND node = ?"
            args = (*args, node)
        with self._read() as conn:
            return [_sandbox(r) for r in conn.execute(query + " ORDER BY created_at, id", args)]

    def count_sandboxes(self, user_id: str | None = None) -> int:
        """Live sandboxes of one user, or of everyone."""
        with self._read() as conn:
            if user_id is not None:
                return _count_live(conn, user_id)
            row = conn.execute("SELECT COUNT(*) FROM sandboxes WHERE deleted_at IS NULL")
            return int(row.fetchone()[0])

    @_retried
    def update_sandbox(
        self,
        sandbox_id: str,
        *,
        status: Status | None = None,
        thermal: Thermal | None = None,
        keep_hot: bool | None = None,
        ip: str | _Unset | None = UNSET,
        engine_state: Mapping[str, Any] | _Unset | None = UNSET,
        labels: Mapping[str, str] | None = None,
        expires_at: float | _Unset | None = UNSET,
        on_expire: OnExpire | None = None,
    ) -> Sandbox:
        """Change the given fields of a live sandbox; return the updated record.

        ``labels`` replaces the whole label set; ``expires_at=None`` removes the expiry.
        """
        sets: list[str] = []
        args: list[object] = []
        if status is not None:
            sets.append("status = ?")
            args.append(Status(status).value)
        if thermal is not None:
            sets.append("thermal = ?")
            args.append(Thermal(thermal).value)
        if keep_hot is not None:
            sets.append("keep_hot = ?")
            args.append(int(as_bool(keep_hot, "keep_hot")))
        if not isinstance(ip, _Unset):
            sets.append("ip = ?")
            args.append(ip)
        if not isinstance(engine_state, _Unset):
            sets.append("engine_state = ?")
            args.append(engine_state_to_json(engine_state))
        if labels is not None:
            sets.append("labels = ?")
            args.append(labels_to_json(labels))
        if not isinstance(expires_at, _Unset):
            sets.append("expires_at = ?")
            args.append(_opt_float(expires_at, "expires_at"))
        if on_expire is not None:
            sets.append("on_expire = ?")
            args.append(OnExpire(on_expire).value)
        with self._write() as conn:
            if sets:
                conn.execute(
                    f"UPDATE sandboxes SET {', '.join(sets)} WHERE id = ? AND deleted_at IS NULL",
                    (*args, sandbox_id),
                )
            return _live(_select_sandbox(conn, sandbox_id), sandbox_id)

    def set_engine_state(self, sandbox_id: str, state: Mapping[str, Any] | None) -> None:
        """Store what ``engine.export_state`` returned (``None`` clears it)."""
        self.update_sandbox(sandbox_id, engine_state=state)

    @_retried
    def touch(self, sandbox_id: str, when: float | None = None) -> None:
        """Record activity; ``last_active_at`` only ever moves forward."""
        when = self._now() if when is None else float(when)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE sandboxes SET last_active_at = CASE WHEN last_active_at < ? THEN ?"
                " ELSE last_active_at END WHERE id = ? AND deleted_at IS NULL",
                (when, when, sandbox_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"sandbox {sandbox_id!r} not found")

    @_retried
    def rename_sandbox(self, sandbox_id: str, new_name: str) -> Sandbox:
        """Rename a live sandbox; :class:`NameTaken` if the owner has a live one of that name."""
        with self._write() as conn:
            sb = _live(_select_sandbox(conn, sandbox_id), sandbox_id)
            if sb.name == new_name:
                return sb
            if _live_sandbox_named(conn, sb.user_id, new_name) is not None:
                raise NameTaken(f"a sandbox named {new_name!r} already exists")
            conn.execute("UPDATE sandboxes SET name = ? WHERE id = ?", (new_name, sandbox_id))
            return _live(_select_sandbox(conn, sandbox_id), sandbox_id)

    @_retried
    def delete_sandbox(self, sandbox_id: str) -> Sandbox:
        """Mark a sandbox deleted, detach its volumes and drop its publish rules.

        The row stays (history; recovery skips it) and its name becomes free.
        """
        with self._write() as conn:
            _live(_select_sandbox(conn, sandbox_id), sandbox_id)
            conn.execute(
                "UPDATE sandboxes SET deleted_at = ? WHERE id = ?", (self._now(), sandbox_id)
            )
            conn.execute("DELETE FROM volume_attachments WHERE sandbox_id = ?", (sandbox_id,))
            conn.execute("DELETE FROM publish_rules WHERE sandbox_id = ?", (sandbox_id,))
            return _sandbox(_one(_select_sandbox(conn, sandbox_id), f"sandbox {sandbox_id!r}"))

    # --- templates ----------------------------------------------------------------------

    @_retried
    def create_template(self, user_id: str, name: str, spec: TemplateSpec) -> Template:
        spec_json = template_spec_to_json(spec)
        template_id = _new_id("tpl")
        with self._write(owner=user_id) as conn:
            _one(_select_user(conn, user_id), f"user {user_id!r}")
            if conn.execute(
                "SELECT 1 FROM templates WHERE user_id = ? AND name = ?", (user_id, name)
            ).fetchone():
                raise NameTaken(f"a template named {name!r} already exists")
            conn.execute(
                "INSERT INTO templates (id, user_id, name, spec, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (template_id, user_id, name, spec_json, self._now()),
            )
            row = conn.execute(
                "SELECT id, user_id, name, spec, created_at FROM templates WHERE id = ?",
                (template_id,),
            )
            return _template(_one(row, f"template {template_id!r}"))

    def get_template(self, user_id: str, template_id: str) -> Template:
        with self._read() as conn:
            row = conn.execute(
                "SELECT id, user_id, name, spec, created_at FROM templates"
                " WHERE user_id = ? AND id = ?",
                (user_id, template_id),
            )
            return _template(_one(row, f"template {template_id!r}"))

    def find_template(self, user_id: str, id_or_name: str) -> Template:
        """A template of ``user_id`` by id, else by name."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT id, user_id, name, spec, created_at FROM templates"
                " WHERE user_id = ? AND (id = ? OR name = ?) ORDER BY id = ? DESC LIMIT 1",
                (user_id, id_or_name, id_or_name, id_or_name),
            )
            return _template(_one(row, f"template {id_or_name!r}"))

    def list_templates(self, user_id: str) -> list[Template]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, user_id, name, spec, created_at FROM templates WHERE user_id = ?"
                " ORDER BY name",
                (user_id,),
            )
            return [_template(r) for r in rows]

    @_retried
    def delete_template(self, user_id: str, template_id: str) -> None:
        with self._write(owner=user_id) as conn:
            cur = conn.execute(
                "DELETE FROM templates WHERE user_id = ? AND id = ?", (user_id, template_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"template {template_id!r} not found")

    # --- images -------------------------------------------------------------------------

    @_retried
    def add_image(
        self,
        owner: str | None,
        name: str,
        *,
        ref: str,
        kind: str,
        digest: str,
        size_bytes: int,
        definition: Mapping[str, Any],
    ) -> ImageRecord:
        """Add an image to the catalog (:class:`NameTaken` if its owner has the name)."""
        image_id = _new_id("img")
        with self._write() as conn:
            if owner is not None:
                _one(_select_user(conn, owner), f"user {owner!r}")
            if _image_named(conn, owner, name) is not None:
                raise NameTaken(f"an image named {name!r} already exists")
            conn.execute(
                f"INSERT INTO images ({_IMAGE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image_id,
                    owner,
                    name,
                    ref,
                    kind,
                    digest,
                    as_int(size_bytes, "size_bytes"),
                    json.dumps(dict(definition), sort_keys=True),
                    self._now(),
                ),
            )
            row = conn.execute(f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (image_id,))
            return _image(_one(row, f"image {image_id!r}"))

    def find_image(self, user_id: str, name: str) -> ImageRecord:
        """The image ``name`` as ``user_id`` sees it: their own, else a global one."""
        with self._read() as conn:
            row = _image_named(conn, user_id, name) or _image_named(conn, None, name)
            if row is None:
                raise NotFound(f"image {name!r} not found")
            return _image(row)

    def image_by_ref(self, ref: str) -> ImageRecord:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_IMAGE_COLS} FROM images WHERE ref = ?", (ref,))
            return _image(_one(row, f"image {ref!r}"))

    def image_ref_exists(self, ref: str) -> bool:
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM images WHERE ref = ?", (ref,)).fetchone() is not None

    def list_images(self, user_id: str) -> list[ImageRecord]:
        """The global images and ``user_id``'s own, by name (own ones first on a tie)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE owner IS NULL OR owner = ?"
                " ORDER BY name, owner IS NULL",
                (user_id,),
            )
            return [_image(r) for r in rows]

    @_retried
    def delete_image(self, image_id: str) -> ImageRecord:
        """Remove an image from the catalog, refused (:class:`Conflict`) while a live
        sandbox runs it."""
        with self._write() as conn:
            row = conn.execute(f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (image_id,))
            image = _image(_one(row, f"image {image_id!r}"))
            users = conn.execute(
                "SELECT COUNT(*) FROM sandboxes WHERE image = ? AND deleted_at IS NULL",
                (image.ref,),
            ).fetchone()[0]
            if users:
                raise ImageInUse(f"image {image.name!r} is used by {users} sandbox(es)")
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
            return image

    def image_disk_used(self, user_id: str) -> int:
        """Bytes of the images ``user_id`` owns, built and saved sandboxes alike (what
        counts against max_image_disk_mb)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT (SELECT COALESCE(SUM(size_bytes), 0) FROM images WHERE owner = ?)"
                " + (SELECT COALESCE(SUM(size_bytes), 0) FROM saved_images WHERE user_id = ?)",
                (user_id, user_id),
            ).fetchone()
            return int(row[0])

    def check_image_quota(self, user: User, more_bytes: int = 0) -> None:
        """Raise :class:`QuotaExceeded` if ``user``'s images (plus ``more_bytes``) exceed
        their image disk quota. Admins build global images, which count for nobody."""
        limit = user.quotas.max_image_disk_mb
        if limit is None:
            return
        used = self.image_disk_used(user.id)
        if used + more_bytes > limit * (1 << 20):
            raise QuotaExceeded(
                f"your images would use {(used + more_bytes) >> 20} MiB of disk, over your"
                f" limit of {limit} MiB: delete an image first"
            )

    # --- secrets ------------------------------------------------------------------------

    @_retried
    def put_secret(self, user_id: str, name: str, value: str) -> SecretInfo:
        """Create or replace a secret; the value is stored encrypted."""
        if not isinstance(value, str):
            raise InvalidValue(f"secret {name!r}: value must be a string")
        ciphertext = self._secret_box().seal(user_id, name, value)
        now = self._now()
        with self._write(owner=user_id) as conn:
            _one(_select_user(conn, user_id), f"user {user_id!r}")
            conn.execute(
                "INSERT INTO secrets (user_id, name, ciphertext, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, name) DO UPDATE SET"
                " ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
                (user_id, name, ciphertext, now, now),
            )
            row = conn.execute(
                "SELECT name, created_at, updated_at FROM secrets WHERE user_id = ? AND name = ?",
                (user_id, name),
            )
            return _secret_info(_one(row, f"secret {name!r}"))

    def list_secrets(self, user_id: str) -> list[SecretInfo]:
        """Names and timestamps only; never values."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, created_at, updated_at FROM secrets WHERE user_id = ? ORDER BY name",
                (user_id,),
            )
            return [_secret_info(r) for r in rows]

    @_retried
    def delete_secret(self, user_id: str, name: str) -> None:
        with self._write(owner=user_id) as conn:
            cur = conn.execute(
                "DELETE FROM secrets WHERE user_id = ? AND name = ?", (user_id, name)
            )
            if cur.rowcount == 0:
                raise NotFound(f"secret {name!r} not found")

    def get_secret_values(self, user_id: str, names: Iterable[str]) -> dict[str, str]:
        """Decrypted values of the named secrets (to inject into a sandbox's env).

        :class:`NotFound` names every missing secret at once.
        """
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        with self._read() as conn:
            marks = ", ".join("?" * len(wanted))
            rows = conn.execute(
                f"SELECT name, ciphertext FROM secrets WHERE user_id = ? AND name IN ({marks})",
                (user_id, *wanted),
            ).fetchall()
        found = {str(r["name"]): bytes(r["ciphertext"]) for r in rows}
        missing = [n for n in wanted if n not in found]
        if missing:
            raise NotFound(f"secret(s) not found: {', '.join(missing)}")
        box = self._secret_box()
        return {n: box.open(user_id, n, found[n]) for n in wanted}

    @_retried
    def claim_setting(self, name: str, value: str) -> bool:
        """Record ``value`` under ``name`` unless another value is there; return whether
        the stored value is ``value`` (a first claim always succeeds)."""
        with self._write() as conn:
            row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return str(row[0]) == value
            conn.execute("INSERT INTO settings (name, value) VALUES (?, ?)", (name, value))
            return True

    @_retried
    def claim_secret_key(self, recipient: str) -> bool:
        """Check that secrets are sealed for ``recipient`` (the age public key of this
        daemon's key file), recording it on first use; return whether it matches.

        Only a store that holds no secret adopts a new key on a mismatch (nothing
        sealed would become unreadable); otherwise the caller decides (the daemon
        refuses to start on a shared store).
        """
        with self._write() as conn:
            row = conn.execute(
                "SELECT value FROM settings WHERE name = ?", (_SECRET_KEY_SETTING,)
            ).fetchone()
            if row is not None and str(row[0]) == recipient:
                return True
            if row is not None and conn.execute("SELECT 1 FROM secrets LIMIT 1").fetchone():
                return False
            conn.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (_SECRET_KEY_SETTING, recipient),
            )
            return True

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            raise SecretKeyError("no secret key configured: the store was opened without one")
        return self._box

    # --- volumes ------------------------------------------------------------------------

    @_retried
    def create_volume(self, user_id: str, name: str, size_mb: int, path: str) -> Volume:
        with self._write(owner=user_id) as conn:
            _one(_select_user(conn, user_id), f"user {user_id!r}")
            vol_id = _insert_volume(
                conn, user_id, name, size_mb=size_mb, path=path, now=self._now()
            )
            return _volume(_one(conn.execute(f"{_VOLUME_SELECT} WHERE v.id = ?", (vol_id,)), name))

    def get_volume(self, user_id: str, name: str) -> Volume:
        with self._read() as conn:
            row = conn.execute(
                f"{_VOLUME_SELECT} WHERE v.user_id = ? AND v.name = ?", (user_id, name)
            )
            return _volume(_one(row, f"volume {name!r}"))

    def list_volumes(self, user_id: str) -> list[Volume]:
        with self._read() as conn:
            rows = conn.execute(f"{_VOLUME_SELECT} WHERE v.user_id = ? ORDER BY v.name", (user_id,))
            return [_volume(r) for r in rows]

    def sandbox_volumes(self, sandbox_id: str) -> list[Volume]:
        """The volumes attached to a sandbox, by mount point."""
        with self._read() as conn:
            rows = conn.execute(
                f"{_VOLUME_SELECT} WHERE a.sandbox_id = ? ORDER BY a.mount", (sandbox_id,)
            )
            return [_volume(r) for r in rows]

    @_retried
    def delete_volume(self, user_id: str, name: str) -> Volume:
        """Delete a volume's row and return it (the caller removes the file).

        :class:`VolumeInUse` while a live sandbox has it attached.
        """
        with self._write(owner=user_id) as conn:
            row = conn.execute(
                f"{_VOLUME_SELECT} WHERE v.user_id = ? AND v.name = ?", (user_id, name)
            )
            vol = _volume(_one(row, f"volume {name!r}"))
            if vol.attached_to is not None:
                raise VolumeInUse(f"volume {name!r} is attached to sandbox {vol.attached_to}")
            conn.execute("DELETE FROM volumes WHERE id = ?", (vol.id,))
            return vol

    # --- saved images ---------------------------------------------------------------------

    @_retried
    def create_saved_image(
        self,
        user_id: str,
        name: str,
        *,
        image_id: str,
        engine: str,
        tier: str,
        cpus: int,
        memory_mb: int,
        size_bytes: int,
        memory: bool,
        source_id: str,
        config: SandboxConfig,
    ) -> SavedImageRecord:
        """:class:`NameTaken` if the user has a saved image of that name."""
        record = SavedImageRecord(
            id=image_id,
            user_id=user_id,
            name=name,
            engine=engine,
            tier=tier,
            cpus=as_int(cpus, "cpus"),
            memory_mb=as_int(memory_mb, "memory_mb"),
            size_bytes=as_int(size_bytes, "size_bytes"),
            memory=bool(memory),
            source_id=source_id,
            config=config,
            created_at=self._now(),
        )
        spec = config_to_json(config)
        with self._write(owner=user_id) as conn:
            _one(_select_user(conn, user_id), f"user {user_id!r}")
            if conn.execute(
                "SELECT 1 FROM saved_images WHERE user_id = ? AND name = ?", (user_id, name)
            ).fetchone():
                raise NameTaken(f"a saved image named {name!r} already exists")
            conn.execute(
                f"INSERT INTO saved_images ({_SAVED_COLS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    user_id,
                    name,
                    engine,
                    tier,
                    record.cpus,
                    record.memory_mb,
                    record.size_bytes,
                    int(record.memory),
                    source_id,
                    spec,
                    record.created_at,
                ),
            )
        return record

    def get_saved_image(self, user_id: str, name: str) -> SavedImageRecord:
        """The user's saved image called ``name`` (another user's is :class:`NotFound`)."""
        with self._read() as conn:
            cur = conn.execute(
                f"SELECT {_SAVED_COLS} FROM saved_images WHERE user_id = ? AND name = ?",
                (user_id, name),
            )
            return _saved_image(_one(cur, f"saved image {name!r}"))

    def saved_image_exists(self, image_id: str) -> bool:
        with self._read() as conn:
            cur = conn.execute("SELECT 1 FROM saved_images WHERE id = ?", (image_id,))
            return cur.fetchone() is not None

    def list_saved_images(self, user_id: str) -> list[SavedImageRecord]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_SAVED_COLS} FROM saved_images WHERE user_id = ? ORDER BY name",
                (user_id,),
            )
            return [_saved_image(r) for r in rows]

    @_retried
    def delete_saved_image(self, user_id: str, name: str) -> SavedImageRecord:
        """Delete the row and return it (the caller deletes the engine's files)."""
        with self._write(owner=user_id) as conn:
            cur = conn.execute(
                f"SELECT {_SAVED_COLS} FROM saved_images WHERE user_id = ? AND name = ?",
                (user_id, name),
            )
            record = _saved_image(_one(cur, f"saved image {name!r}"))
            conn.execute("DELETE FROM saved_images WHERE id = ?", (record.id,))
            return record

    @_retried
    def set_sandbox_node(self, sandbox_id: str, node: str | None) -> Sandbox:
        """Move a live sandbox's row to ``node`` (its files and state are the caller's)."""
        with self._write() as conn:
            _live(_select_sandbox(conn, sandbox_id), sandbox_id)
            conn.execute("UPDATE sandboxes SET node = ? WHERE id = ?", (node, sandbox_id))
            return _sandbox(_one(_select_sandbox(conn, sandbox_id), f"sandbox {sandbox_id!r}"))

    @_retried
    def claim_sandbox(
        self, sandbox_id: str, *, from_node: str, to_node: str, lost_only: bool = True
    ) -> Sandbox | None:
        """Move a live sandbox's row from ``from_node`` to ``to_node`` if it is still
        ``from_node``'s and (``lost_only``) that node's lease has run out: one
        conditional update, so of two nodes racing to take one sandbox over exactly
        one gets the row (the other None), and a node that came back in time keeps
        it. Returns the moved row; None when the condition does not hold."""
        with self._write() as conn:
            lost = " AND EXISTS (SELECT 1 FROM nodes WHERE name = ? AND lease_until < ?)"
            cur = conn.execute(
                "UPDATE sandboxes SET node = ? WHERE id = ? AND deleted_at IS NULL AND node = ?"
                + (lost if lost_only else ""),
                (to_node, sandbox_id, from_node, *((from_node, self._now()) if lost_only else ())),
            )
            if cur.rowcount == 0:
                return None
            return _sandbox(_one(_select_sandbox(conn, sandbox_id), f"sandbox {sandbox_id!r}"))

    # --- nodes ----------------------------------------------------------------------------

    @_retried
    def register_node(
        self,
        name: str,
        *,
        address: str,
        engines: Sequence[str],
        cpus: int,
        memory_mb: int,
        disk_mb: int,
        lease_s: float,
        load: float = 0.0,
    ) -> Node:
        """Add this node, or take its row over again after a restart: its address,
        resources and a fresh lease; its state (a drain) is kept, its ``starting``
        count reset (the creates it counted died with the old process)."""
        if not name or not address:
            raise InvalidValue("a node needs a name and an address")
        now = self._now()
        values = (
            address,
            json.dumps(list(engines)),
            as_int(cpus, "cpus"),
            as_int(memory_mb, "memory_mb"),
            as_int(disk_mb, "disk_mb"),
            float(load),
            now + float(lease_s),
        )
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE nodes SET address = ?, engines = ?, cpus = ?, memory_mb = ?,"
                " disk_mb = ?, load = ?, lease_until = ?, starting = 0, starting_cpus = 0,"
                " starting_memory_mb = 0 WHERE name = ?",
                (*values, name),
            )
            if cur.rowcount == 0:
                conn.execute(
                    f"INSERT INTO nodes ({_NODE_COLS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, 0, 0)",
                    (name, *values[:6], NodeState.ACTIVE.value, now, values[6]),
                )
            return _node(_one(_select_node(conn, name), f"node {name!r}"))

    @_retried
    def renew_node(self, name: str, *, lease_s: float, load: float | None = None) -> Node:
        """Extend ``name``'s lease by ``lease_s`` from now (and record its load).
        :class:`NotFound` if the row is gone (removed by an admin: register again)."""
        with self._write() as conn:
            until = self._now() + float(lease_s)
            if load is None:
                cur = conn.execute("UPDATE nodes SET lease_until = ? WHERE name = ?", (until, name))
            else:
                cur = conn.execute(
                    "UPDATE nodes SET lease_until = ?, load = ? WHERE name = ?",
                    (until, float(load), name),
                )
            if cur.rowcount == 0:
                raise NotFound(f"node {name!r} not found")
            return _node(_one(_select_node(conn, name), f"node {name!r}"))

    def get_node(self, name: str) -> Node:
        with self._read() as conn:
            return _node(_one(_select_node(conn, name), f"node {name!r}"))

    def list_nodes(self) -> list[Node]:
        with self._read() as conn:
            return [_node(r) for r in conn.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY name")]

    def node_usage(self, names: Sequence[str] | None = None) -> dict[str, NodeUsage]:
        """What the live sandboxes of each node (of ``names``, or every node that has
        any) take; a node with none is absent."""
        with self._read() as conn:
            return _node_usage(conn, names)

    @_retried
    def reserve_node(
        self,
        shortlist: Callable[[Sequence[NodeLoad]], Sequence[str]],
        choose: Callable[[Sequence[NodeLoad]], str | None],
        *,
        cpus: int,
        memory_mb: int,
    ) -> Node | None:
        """Placement's transaction: pick a node for a sandbox of ``cpus`` and
        ``memory_mb`` and count the create as starting there; None if none fits.

        ``shortlist`` sees every active node whose lease holds, with what its live
        sandboxes take, and names the candidates; their rows are then locked
        (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite has one writer anyway) and
        read again, and ``choose`` picks one of them, or none. The chosen row's
        ``starting`` count and reservation (``starting_cpus``, ``starting_memory_mb``)
        grow in the same transaction, so a placement on another API node that locks
        the row next sees them: two nodes placing at once never fill the same free
        capacity. :meth:`release_node` gives the reservation back.
        """
        cpus, memory_mb = as_int(cpus, "cpus"), as_int(memory_mb, "memory_mb")
        alive = "state = 'active' AND lease_until >= ?"
        with self._write(row_locks=True) as conn:
            now = self._now()
            rows = conn.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE {alive}", (now,))
            nodes = [_node(r) for r in rows]
            usage = _node_usage(conn, None)
            names = sorted(set(shortlist([_load(n, usage) for n in nodes])))
            if not names:
                return None
            marks = ", ".join("?" * len(names))
            rows = conn.execute(
                f"SELECT {_NODE_COLS} FROM nodes WHERE name IN ({marks}) AND {alive}"
                f" ORDER BY name{self._backend.for_update}",
                (*names, now),
            )
            locked = [_node(r) for r in rows]
            usage = _node_usage(conn, [n.name for n in locked])
            name = choose([_load(n, usage) for n in locked])
            if name is None:
                return None
            conn.execute(
                "UPDATE nodes SET starting = starting + 1, starting_cpus = starting_cpus + ?,"
                " starting_memory_mb = starting_memory_mb + ?, starting_since = ? WHERE name = ?",
                (cpus, memory_mb, now, name),
            )
            return _node(_one(_select_node(conn, name), f"node {name!r}"))

    @_retried
    def release_node(self, name: str, *, cpus: int, memory_mb: int) -> None:
        """A create :meth:`reserve_node` counted on ``name`` is over (done or failed)."""
        with self._write(row_locks=True) as conn:
            conn.execute(
                "UPDATE nodes SET"
                " starting = CASE WHEN starting > 0 THEN starting - 1 ELSE 0 END,"
                " starting_cpus = CASE WHEN starting_cpus > ? THEN starting_cpus - ? ELSE 0 END,"
                " starting_memory_mb = CASE WHEN starting_memory_mb > ?"
                " THEN starting_memory_mb - ? ELSE 0 END"
                " WHERE name = ?",
                (cpus, cpus, memory_mb, memory_mb, name),
            )

    @_retried
    def forget_stale_starts(self, name: str, *, older_than_s: float) -> bool:
        """Zero ``name``'s starting count and reservation when nothing was counted there
        for ``older_than_s`` (longer than any create is waited for): what is left is
        what a placing node that died never gave back. Returns whether it did."""
        with self._write(row_locks=True) as conn:
            cur = conn.execute(
                "UPDATE nodes SET starting = 0, starting_cpus = 0, starting_memory_mb = 0"
                " WHERE name = ? AND starting > 0 AND starting_since < ?",
                (name, self._now() - float(older_than_s)),
            )
            return bool(cur.rowcount)

    @_retried
    def set_node_state(self, name: str, state: NodeState) -> Node:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE nodes SET state = ? WHERE name = ?", (NodeState(state).value, name)
            )
            if cur.rowcount == 0:
                raise NotFound(f"node {name!r} not found")
            return _node(_one(_select_node(conn, name), f"node {name!r}"))

    @_retried
    def delete_node(self, name: str) -> None:
        """Forget a node; refused (:class:`Conflict`) while live sandboxes are on it."""
        with self._write() as conn:
            on_it = conn.execute(
                "SELECT COUNT(*) FROM sandboxes WHERE node = ? AND deleted_at IS NULL", (name,)
            ).fetchone()[0]
            if on_it:
                raise Conflict(f"node {name!r} still has {on_it} live sandbox(es)")
            if conn.execute("DELETE FROM nodes WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"node {name!r} not found")

    @_retried
    def adopt_unplaced(self, name: str) -> int:
        """Give node ``name`` the live sandboxes that have no node (made by a single
        daemon before the store was shared), unless another node is alive: then whose
        they were is unknown and they stay as they are. Returns how many it took."""
        with self._write() as conn:
            others = conn.execute(
                "SELECT COUNT(*) FROM nodes WHERE name <> ? AND lease_until >= ?",
                (name, self._now()),
            ).fetchone()[0]
            if others:
                return 0
            cur = conn.execute(
                "UPDATE sandboxes SET node = ? WHERE node IS NULL AND deleted_at IS NULL", (name,)
            )
            return int(cur.rowcount)

    # --- publish rules --------------------------------------------------------------------

    @_retried
    def add_publish_rule(self, sandbox_id: str, port: int, alias: str) -> PublishRule:
        """Publish ``port`` of a live sandbox as ``alias`` (globally unique)."""
        port = as_int(port, "port")
        if not 1 <= port <= 65535:
            raise InvalidValue(f"port must be within 1..65535, got {port}")
        rule = PublishRule(_new_id("pub"), sandbox_id, port, alias, self._now())
        with self._write() as conn:
            _live(_select_sandbox(conn, sandbox_id), sandbox_id)
            taken = conn.execute(
                "SELECT alias FROM publish_rules WHERE sandbox_id = ? AND port = ?",
                (sandbox_id, port),
            ).fetchone()
            if taken:
                raise NameTaken(f"port {port} is already published as {taken[0]!r}")
            if conn.execute("SELECT 1 FROM publish_rules WHERE alias = ?", (alias,)).fetchone():
                raise NameTaken(f"alias {alias!r} is already in use")
            conn.execute(
                f"INSERT INTO publish_rules ({_RULE_COLS}) VALUES (?, ?, ?, ?, ?)",
                (rule.id, sandbox_id, port, alias, rule.created_at),
            )
        return rule

    def list_publish_rules(self, sandbox_id: str) -> list[PublishRule]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_RULE_COLS} FROM publish_rules WHERE sandbox_id = ? ORDER BY port",
                (sandbox_id,),
            )
            return [_rule(r) for r in rows]

    def publish_rule_by_alias(self, alias: str) -> PublishRule:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_RULE_COLS} FROM publish_rules WHERE alias = ?", (alias,))
            return _rule(_one(row, f"published alias {alias!r}"))

    @_retried
    def delete_publish_rule(self, sandbox_id: str, port: int) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM publish_rules WHERE sandbox_id = ? AND port = ?", (sandbox_id, port)
            )
            if cur.rowcount == 0:
                raise NotFound(f"port {port} is not published")


# --- helpers (all called with the lock held) ---------------------------------------------


def _one_row(row: Row | None, what: str) -> Row:
    if row is None:
        raise NotFound(f"{what} not found")
    return row


def _one(cur: Cursor, what: str) -> Row:
    row: Row | None = cur.fetchone()
    return _one_row(row, what)


def _select_user(conn: Connection, user_id: str) -> Cursor:
    return conn.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,))


def _select_sandbox(conn: Connection, sandbox_id: str) -> Cursor:
    return conn.execute(f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE id = ?", (sandbox_id,))


def _live(cur: Cursor, sandbox_id: str) -> Sandbox:
    row: Row | None = cur.fetchone()
    if row is None or row["deleted_at"] is not None:
        raise NotFound(f"sandbox {sandbox_id!r} not found")
    return _sandbox(row)


def _live_sandbox_named(conn: Connection, user_id: str, name: str) -> Row | None:
    row: Row | None = conn.execute(
        f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE user_id = ? AND name = ?"
        " AND deleted_at IS NULL",
        (user_id, name),
    ).fetchone()
    return row


def _count_live(conn: Connection, user_id: str) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM sandboxes WHERE user_id = ? AND deleted_at IS NULL", (user_id,)
    ).fetchone()
    return int(row[0])


def _check_quota(conn: Connection, quotas: Quotas, cpus: int, memory_mb: int, live: int) -> None:
    if quotas.max_cpus is not None and cpus > quotas.max_cpus:
        raise QuotaExceeded(f"cpus {cpus} exceeds your limit of {quotas.max_cpus} per sandbox")
    if quotas.max_memory_mb is not None and memory_mb > quotas.max_memory_mb:
        raise QuotaExceeded(
            f"memory_mb {memory_mb} exceeds your limit of {quotas.max_memory_mb} per sandbox"
        )
    if quotas.max_sandboxes is not None and live >= quotas.max_sandboxes:
        raise QuotaExceeded(f"you already have {live} of at most {quotas.max_sandboxes} sandboxes")


def _opt_float(value: object, what: str) -> float | None:
    """A time for a ``REAL`` column: a finite number or None (NaN would never expire)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidValue(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _checked_quotas(quotas: Quotas) -> Quotas:
    checked = Quotas(
        as_opt_int(quotas.max_sandboxes, "max_sandboxes"),
        as_opt_int(quotas.max_cpus, "max_cpus"),
        as_opt_int(quotas.max_memory_mb, "max_memory_mb"),
        as_opt_int(quotas.max_image_disk_mb, "max_image_disk_mb"),
    )
    for field_name, value in (
        ("max_sandboxes", checked.max_sandboxes),
        ("max_cpus", checked.max_cpus),
        ("max_memory_mb", checked.max_memory_mb),
        ("max_image_disk_mb", checked.max_image_disk_mb),
    ):
        if value is not None and value < 0:
            raise InvalidValue(f"{field_name} must not be negative, got {value}")
    return checked


def _insert_volume(
    conn: Connection, user_id: str, name: str, *, size_mb: int, path: str, now: float
) -> str:
    size_mb = as_int(size_mb, "size_mb")
    if size_mb < 1:
        raise InvalidValue(f"volume {name!r}: size_mb must be positive, got {size_mb}")
    if conn.execute(
        "SELECT 1 FROM volumes WHERE user_id = ? AND name = ?", (user_id, name)
    ).fetchone():
        raise NameTaken(f"a volume named {name!r} already exists")
    vol_id = _new_id("vol")
    conn.execute(
        "INSERT INTO volumes (id, user_id, name, size_mb, path, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (vol_id, user_id, name, size_mb, path, now),
    )
    return vol_id


def _attach(conn: Connection, user_id: str, sandbox_id: str, name: str, mount: str) -> None:
    row = conn.execute(
        "SELECT v.id, a.sandbox_id FROM volumes v LEFT JOIN volume_attachments a"
        " ON a.volume_id = v.id WHERE v.user_id = ? AND v.name = ?",
        (user_id, name),
    ).fetchone()
    if row is None:
        raise NotFound(f"volume {name!r} not found")
    if row["sandbox_id"] is not None:
        raise VolumeInUse(f"volume {name!r} is attached to sandbox {row['sandbox_id']}")
    if conn.execute(
        "SELECT 1 FROM volume_attachments WHERE sandbox_id = ? AND mount = ?", (sandbox_id, mount)
    ).fetchone():
        raise InvalidValue(f"two volumes mounted at {mount}")
    conn.execute(
        "INSERT INTO volume_attachments (volume_id, sandbox_id, mount) VALUES (?, ?, ?)",
        (row["id"], sandbox_id, mount),
    )


# --- rows → records --------------------------------------------------------------------


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """A stored value of the wrong type is a damaged database, not a caller's mistake."""
    try:
        yield
    except ValueError as exc:  # InvalidValue, or an unknown Status/Thermal
        raise SchemaError(f"bad stored {what}: {exc}") from exc


def _user(row: Row) -> User:
    with _reading("user"):
        return User(
            id=str(row["id"]),
            name=str(row["name"]),
            is_admin=as_bool(row["is_admin"], "is_admin"),
            quotas=Quotas(
                as_opt_int(row["max_sandboxes"], "max_sandboxes"),
                as_opt_int(row["max_cpus"], "max_cpus"),
                as_opt_int(row["max_memory_mb"], "max_memory_mb"),
                as_opt_int(row["max_image_disk_mb"], "max_image_disk_mb"),
            ),
            created_at=float(row["created_at"]),
        )


def _sandbox(row: Row) -> Sandbox:
    with _reading(f"sandbox {row['id']}"):
        return Sandbox(
            id=str(row["id"]),
            user_id=str(row["user_id"]),
            name=str(row["name"]),
            cpus=as_int(row["cpus"], "cpus"),
            memory_mb=as_int(row["memory_mb"], "memory_mb"),
            image=str(row["image"]),
            keep_hot=as_bool(row["keep_hot"], "keep_hot"),
            status=Status(row["status"]),
            thermal=Thermal(row["thermal"]),
            ip=None if row["ip"] is None else str(row["ip"]),
            engine=str(row["engine"]),
            engine_state=engine_state_from_json(row["engine_state"]),
            config=config_from_json(row["spec"]),
            created_at=float(row["created_at"]),
            last_active_at=float(row["last_active_at"]),
            deleted_at=None if row["deleted_at"] is None else float(row["deleted_at"]),
            labels=labels_from_json(row["labels"]),
            expires_at=None if row["expires_at"] is None else float(row["expires_at"]),
            on_expire=OnExpire(row["on_expire"]),
            node=None if row["node"] is None else str(row["node"]),
        )


def _select_node(conn: Connection, name: str) -> Cursor:
    return conn.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE name = ?", (name,))


def _node_usage(conn: Connection, names: Sequence[str] | None) -> dict[str, NodeUsage]:
    query = (
        "SELECT node, COUNT(*), COALESCE(SUM(cpus), 0), COALESCE(SUM(memory_mb), 0)"
        " FROM sandboxes WHERE deleted_at IS NULL"
    )
    args: tuple[str, ...] = ()
    if names is None:
        query += " AND node IS NOT NULL"
    elif not names:
        return {}
    else:
        query += f" AND node IN ({', '.join('?' * len(names))})"
        args = tuple(names)
    rows = conn.execute(query + " GROUP BY node", args)
    return {str(r[0]): NodeUsage(int(r[1]), int(r[2]), int(r[3])) for r in rows}


def _load(node: Node, usage: Mapping[str, NodeUsage]) -> NodeLoad:
    return NodeLoad(node, usage.get(node.name, NodeUsage()))


def _node(row: Row) -> Node:
    with _reading(f"node {row['name']}"):
        engines = json.loads(row["engines"])
        if not isinstance(engines, list) or not all(isinstance(e, str) for e in engines):
            raise InvalidValue(f"engines must be a list of names, got {engines!r}")
        return Node(
            name=str(row["name"]),
            address=str(row["address"]),
            engines=tuple(engines),
            cpus=as_int(row["cpus"], "cpus"),
            memory_mb=as_int(row["memory_mb"], "memory_mb"),
            disk_mb=as_int(row["disk_mb"], "disk_mb"),
            load=float(row["load"]),
            state=NodeState(row["state"]),
            starting=as_int(row["starting"], "starting"),
            registered_at=float(row["registered_at"]),
            lease_until=float(row["lease_until"]),
            starting_cpus=as_int(row["starting_cpus"], "starting_cpus"),
            starting_memory_mb=as_int(row["starting_memory_mb"], "starting_memory_mb"),
        )


def _template(row: Row) -> Template:
    with _reading(f"template {row['id']}"):
        return Template(
            id=str(row["id"]),
            user_id=str(row["user_id"]),
            name=str(row["name"]),
            spec=template_spec_from_json(row["spec"]),
            created_at=float(row["created_at"]),
        )


def _image_named(conn: Connection, owner: str | None, name: str) -> Row | None:
    # Not "owner IS ?": PostgreSQL has no IS with a parameter.
    if owner is None:
        cur = conn.execute(
            f"SELECT {_IMAGE_COLS} FROM images WHERE owner IS NULL AND name = ?", (name,)
        )
    else:
        cur = conn.execute(
            f"SELECT {_IMAGE_COLS} FROM images WHERE owner = ? AND name = ?", (owner, name)
        )
    row: Row | None = cur.fetchone()
    return row


def _image(row: Row) -> ImageRecord:
    with _reading(f"image {row['id']}"):
        definition = json.loads(row["definition"])
        return ImageRecord(
            id=str(row["id"]),
            owner=None if row["owner"] is None else str(row["owner"]),
            name=str(row["name"]),
            ref=str(row["ref"]),
            kind=str(row["kind"]),
            digest=str(row["digest"]),
            size_bytes=int(row["size_bytes"]),
            definition=definition if isinstance(definition, dict) else {},
            created_at=float(row["created_at"]),
        )


def _secret_info(row: Row) -> SecretInfo:
    return SecretInfo(str(row["name"]), float(row["created_at"]), float(row["updated_at"]))


def _volume(row: Row) -> Volume:
    with _reading(f"volume {row['id']}"):
        return Volume(
            id=str(row["id"]),
            user_id=str(row["user_id"]),
            name=str(row["name"]),
            size_mb=as_int(row["size_mb"], "size_mb"),
            path=str(row["path"]),
            created_at=float(row["created_at"]),
            attached_to=None if row["sandbox_id"] is None else str(row["sandbox_id"]),
            mount=None if row["mount"] is None else str(row["mount"]),
        )


def _saved_image(row: Row) -> SavedImageRecord:
    with _reading(f"saved image {row['id']}"):
        return SavedImageRecord(
            id=str(row["id"]),
            user_id=str(row["user_id"]),
            name=str(row["name"]),
            engine=str(row["engine"]),
            tier=str(row["tier"]),
            cpus=as_int(row["cpus"], "cpus"),
            memory_mb=as_int(row["memory_mb"], "memory_mb"),
            size_bytes=as_int(row["size_bytes"], "size_bytes"),
            memory=as_bool(row["memory"], "memory"),
            source_id=str(row["source_id"]),
            config=config_from_json(row["spec"]),
            created_at=float(row["created_at"]),
        )


def _rule(row: Row) -> PublishRule:
    return PublishRule(
        id=str(row["id"]),
        sandbox_id=str(row["sandbox_id"]),
        port=as_int(row["port"], "port"),
        alias=str(row["alias"]),
        created_at=float(row["created_at"]),
    )
