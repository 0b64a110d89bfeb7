"""File operations on behalf of a user: their permissions, their ownership, their home.

The agent runs as root. A file request that names a user must succeed or fail
exactly as the same syscalls would for that user, and what it creates must be
theirs. Rather than re-implementing the kernel's permission rules (mode bits,
groups, sticky directories, ACLs), the syscalls run in a worker thread whose
*filesystem* identity is switched to the user's: Linux keeps fsuid, fsgid and the
supplementary groups per thread, and a non-zero fsuid drops the capabilities that
bypass file permissions (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN, ...) for that
thread only. The glibc wrappers of setfsuid/setfsgid change only the calling
thread; setgroups goes through syscall(2), because glibc's wrapper applies it to
every thread of the process. The thread gets its identity back before it
returns to the pool.

A request without a user keeps the original behaviour: the agent acts as
itself and gives what it creates to the sandbox user. Where the identity cannot
be switched (a kernel or sandbox runtime without setfsuid, such as some gVisor
releases), a request with a user falls back to that too, giving what it creates
to the user: ownership stays right, permissions are not enforced (logged once).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from .context import GuestContext, UserInfo
from .errors import RequestError
from .spawner import Credentials

T = TypeVar("T")
log = logging.getLogger(__name__)

#: setgroups(2) by architecture (the raw syscall is per thread).
_SYS_SETGROUPS: Final = {"x86_64": 116, "aarch64": 159, "i686": 81, "riscv64": 159}
_NO_CHANGE: Final = 0xFFFFFFFF  # an invalid id: setfsuid(-1) only reports the current one

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _setgroups(groups: tuple[int, ...]) -> None:
    number = _SYS_SETGROUPS.get(platform.machine())
    if number is None:
        raise RequestError(f"acting as a user is not supported on {platform.machine()}")
    array = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    if _c().syscall(number, ctypes.c_long(len(groups)), array) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _set_fs_ids(uid: int, gid: int) -> None:
    libc = _c()
    libc.setfsgid(ctypes.c_uint32(gid))
    libc.setfsuid(ctypes.c_uint32(uid))
    # Neither reports failure; ask for the current values instead.
    if (
        libc.setfsuid(ctypes.c_uint32(_NO_CHANGE)) != uid
        or libc.setfsgid(ctypes.c_uint32(_NO_CHANGE)) != gid
    ):
        raise RequestError(f"cannot switch the filesystem identity to {uid}:{gid}")


def run_with_fs_identity(creds: Credentials, fn: Callable[[], T]) -> T:
    """Call ``fn`` with this thread's filesystem identity switched to ``creds``."""
    own_uid, own_gid = os.geteuid(), os.getegid()
    own_groups = tuple(os.getgroups())
    _setgroups(creds.groups)
    try:
        _set_fs_ids(creds.uid, creds.gid)
        try:
            return fn()
        finally:
            _set_fs_ids(own_uid, own_gid)
    finally:
        _setgroups(own_groups)


@functools.cache
def identity_switching() -> bool:
    """Whether this system lets a thread take another filesystem identity (probed
    once, by switching to nobody's ids and back)."""
    try:
        run_with_fs_identity(Credentials(65534, 65534, ()), lambda: None)
    except (OSError, RequestError) as exc:
        log.warning(
            "file operations cannot act as other users here (%s): the agent "
            "performs them itself and gives what it creates to the user",
            exc,
        )
        return False
    return True


@dataclass(frozen=True, slots=True)
class Actor:
    """Who a file request acts as.

    ``user`` None: the agent itself, handing what it creates to the sandbox user
    (the protocol's original behaviour). ``creds`` None: no identity switch (the
    user is the agent's own, typically root).
    """

    ctx: GuestContext
    user: UserInfo | None
    creds: Credentials | None
    #: Without an identity switch for another user: who gets what is created.
    owner: tuple[int, int] | None = None

    def resolve(self, path: str) -> str:
        """Relative paths (and ``~``) start at the user's home, else at the workdir."""
        if self.user is None:
            return self.ctx.resolve_path(path)
        if path == "~" or path.startswith("~/"):
            path = self.user.home + path[1:]
        return os.path.join(self.user.home, path)

    def resolve_clean(self, path: str) -> str:
        """:meth:`resolve`, normalised (no ``..``, ``.`` or trailing slash)."""
        return os.path.normpath(self.resolve(path))

    def own(self, target: str | int, existing: tuple[int, int] | None = None) -> None:
        """Give ``target`` (created or replaced by this request) its owner: the sandbox
        user, or ``existing`` (the owner of the file it replaces) when known."""
        if self.user is None:
            self.ctx.give_to_user(target, existing)
        elif self.creds is None and os.geteuid() == 0:
            owner = existing or self.owner
            if owner is None:
                return
            uid, gid = owner
            if isinstance(target, int):
                os.fchown(target, uid, gid)
            else:
                os.chown(target, uid, gid)
        # A switched identity creates files as the user already: nothing to do.

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (blocking syscalls) as this actor, in the calling thread."""
        if self.creds is None:
            return fn()
        return run_with_fs_identity(self.creds, fn)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` as this actor in a worker thread."""
        return await asyncio.to_thread(self.call, fn)


def actor_for(ctx: GuestContext, name: str | None) -> Actor:
    if name is None:
        return Actor(ctx, None, None)
    user = UserInfo.lookup(name)
    if user.uid == os.geteuid():
        return Actor(ctx, user, None)
    if os.geteuid() != 0:
        raise RequestError(f"cannot act as {name!r}: the agent is not root")
    if not identity_switching():
        return Actor(ctx, user, None, (user.uid, user.gid))
    return Actor(ctx, user, ctx.credentials(user))
