"""What every handler shares: settings, users, the child environment, activity, sync,
and the reading of the host's frames."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import os
import pwd
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.protocol import Frame, FrameStream, FrameType

from .errors import RequestError, SpawnerUnavailable
from .process import Child, Children
from .spawner import Credentials, ForkedSpawner, Spawner, Spawners

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VM_WORKDIR = "/workspace"


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    uid: int
    gid: int
    home: str
    shell: str = "/bin/sh"

    @classmethod
    def from_pwd(cls, entry: pwd.struct_passwd) -> UserInfo:
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)

    @classmethod
    def current(cls) -> UserInfo:
        uid = os.geteuid()
        try:
            return cls.from_pwd(pwd.getpwuid(uid))
        except KeyError:
            # A uid without a passwd entry (containers): still a usable identity.
            home = os.environ.get("HOME", "/")
            return cls(os.environ.get("USER", str(uid)), uid, os.getegid(), home)

    @classmethod
    def lookup(cls, name: str) -> UserInfo:
        """A user by name, or by numeric uid."""
        try:
            if name.isdigit():
                return cls.from_pwd(pwd.getpwuid(int(name)))
            return cls.from_pwd(pwd.getpwnam(name))
        except KeyError:
            raise RequestError(f"unknown user {name!r}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the agent's behaviour depends on, decided once at start."""

    test_mode: bool
    workdir: str
    user: UserInfo
    sandbox_env: Mapping[str, str] = field(default_factory=dict)
    token: str | None = None
    auth_timeout: float = 5.0
    session_idle_timeout: float | None = None
    max_finished_sessions: int = 64
    #: Flush to disk before answering: sync() before a piped EXIT, fsync of a
    #: written file and its directory. What a host snapshot right after needs;
    #: off in test mode, where nothing snapshots the disk.
    durable: bool = True
    #: Close a connection only after the host has closed its side, so the TCP
    #: TIME_WAIT is the host's, never ours. gVisor (2022) refuses to checkpoint a
    #: sandbox with any connection in TIME_WAIT, for 60 s after each request.
    host_closes_first: bool = False


class Syncer:
    """``sync()`` in a worker thread, shared by everyone who asks while one is queued.

    A caller needs a sync that *starts* after its own writes; a sync already
    running may have missed them, so callers arriving during a run share the
    next one, and callers arriving before that next one starts share it too.
    """

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await asyncio.shield(fut)

    def start(self) -> None:
        """A sync now, with nobody waiting: the next caller's shares it, or finds less
        to flush."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # Nobody may ask for this one's outcome: a failure is the next one's to report.
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._next is not None:
                fut, self._next = self._next, None
                try:
                    await asyncio.to_thread(os.sync)
                except Exception as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(None)
        finally:
            self._task = None

    async def aclose(self) -> None:
        if self._task is not None:
            await asyncio.wait([self._task])


async def recv_frame(conn: FrameStream) -> Frame | None:
    """The next frame a handler acts on; None at the end of the stream.

    Frame types this version does not know are skipped (forward compatibility),
    and so is AUTH: the token has been checked before the request (or none is set).
    """
    while True:
        frame = await conn.recv()
        if frame is None or (frame.known and frame.type != FrameType.AUTH):
            return frame


class GuestContext:
    """Shared state of a running agent, handed to every handler."""

    def __init__(self, settings: Settings, children: Children) -> None:
        self.settings = settings
        self.children = children
        self.syncer = Syncer()
        self.last_activity = time.time()
        #: Piped execs in flight (host connected, process running).
        self.running_execs: set[Child] = set()
        #: Directory watches with a host connected (they keep the sandbox active).
        self.watches = 0
        self._is_root = os.geteuid() == 0
        #: Helpers that start commands as other users without forking the agent.
        self.spawners = Spawners(children) if self._is_root else None
        self._credentials: dict[UserInfo, Credentials] = {}
        self._user_db_stamp: tuple[tuple[int, int, int] | None, ...] = ()

    def touch(self) -> None:
        self.last_activity = time.time()

    def resolve_path(self, path: str) -> str:
        """A request path: relative ones resolve against the default working directory."""
        return os.path.join(self.settings.workdir, path)

    def exec_user(self, name: str | None) -> UserInfo:
        if name is None or name == self.settings.user.name:
            return self.settings.user
        user = UserInfo.lookup(name)
        if user.uid != os.geteuid() and not self._is_root:
            raise RequestError(f"cannot run as {name!r}: the agent is not root")
        return user

    def exec_env(
        self, request_env: Mapping[str, str], user: UserInfo, *, tty: bool
    ) -> dict[str, str]:
        """defaults ← sandbox env (config drive) ← request env."""
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": user.home,
            "TERM": "xterm-256color" if tty else "dumb",
            "LANG": "C.UTF-8",
            "USER": user.name,
            "LOGNAME": user.name,
        }
        env.update(self.settings.sandbox_env)
        env.update(request_env)
        return env

    def exec_cwd(self, cwd: str | None, user: UserInfo | None = None) -> str:
        """The working directory of a command: the default one, a path (relative to
        the default), or with ``user``, ``~`` / ``~/...`` in that user's home."""
        if not cwd:
            return self.settings.workdir
        if user is not None and (cwd == "~" or cwd.startswith("~/")):
            return os.path.join(user.home, cwd[2:])
        return self.resolve_path(cwd)

    def credentials(self, user: UserInfo) -> Credentials | None:
        """What running as ``user`` takes (None: we already are it)."""
        if user.uid == os.geteuid():
            return None
        # getgrouplist parses /etc/group at every call: reuse its answer until the
        # user database changes (groupadd, usermod, ... replace the files).
        stamp = _file_stamp("/etc/group"), _file_stamp("/etc/passwd")
        if stamp != self._user_db_stamp:
            self._credentials.clear()
            self._user_db_stamp = stamp
        creds = self._credentials.get(user)
        if creds is None:
            creds = self._credentials[user] = user_credentials(user)
        return creds

    def _spawner(self, creds: Credentials | None) -> Spawner | None:
        """The spawner for ``creds``; None when we start the command ourselves."""
        if creds is None or self.spawners is None:
            return None  # no change of user: subprocess uses vfork anyway
        try:
            return self.spawners.get(creds)
        except SpawnerUnavailable:
            return None

    async def start_command(
        self,
        argv: Sequence[str],
        user: UserInfo,
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        cwd: str,
        env: Mapping[str, str],
    ) -> Child:
        """Start a piped command as ``user`` in its own process group.

        Raises OSError (cannot start: see ``spawn_failure``), ValueError (bad
        arguments), RequestError (the outcome is unknown).
        """
        creds = self.credentials(user)
        spawner = self._spawner(creds)
        if spawner is not None:
            with contextlib.suppress(SpawnerUnavailable):  # nothing started: do it ourselves
                return await spawner.spawn(
                    argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env
                )
        return self.children.spawn(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            close_fds=True,
            process_group=0,
            **_popen_user(creds),
        )

    async def start_on_terminal(
        self, argv: Sequence[str], user: UserInfo, *, slave: int, cwd: str, env: Mapping[str, str]
    ) -> Child:
        """Start a command as ``user``, leader of a new session whose controlling
        terminal is the pty ``slave``. Raises as :meth:`start_command`."""
        creds = self.credentials(user)
        spawner = self._spawner(creds)
        if spawner is not None:
            try:
                tty: str | None = os.ttyname(slave)  # the spawner's child opens it by name
            except OSError:
                tty = None
            if tty is not None:
                with contextlib.suppress(SpawnerUnavailable):  # nothing started: do it ourselves
                    return await spawner.spawn_on_terminal(argv, tty=tty, cwd=cwd, env=env)
        return self.children.spawn(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            close_fds=True,
            start_new_session=True,
            preexec_fn=_take_controlling_tty,
            **_popen_user(creds),
        )

    def prepare_spawner(self, user: UserInfo, forked: ForkedSpawner | None = None) -> None:
        """Have ``user``'s spawner ready before its first command: ``forked`` (made
        before a template snapshot) if its credentials are still the user's, else a new one."""
        creds = self.credentials(user)
        if forked is not None:
            if creds is not None and self.spawners is not None and forked.creds == creds:
                self.spawners.add(forked)
                return
            forked.sock.close()  # it exits; the reaper collects it
        self._spawner(creds)

    def give_to_user(self, path: str | int, owner: tuple[int, int] | None = None) -> None:
        """chown a file the agent created (as root) to ``owner`` (uid, gid), by default
        the sandbox user. Nothing to do when the agent is not root."""
        if not self._is_root:
            return
        uid, gid = owner if owner is not None else (self.settings.user.uid, self.settings.user.gid)
        if uid == 0 and gid == 0:
            return  # root created it: it is root's already
        if isinstance(path, int):
            os.fchown(path, uid, gid)
        else:
            os.chown(path, uid, gid)


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _popen_user(creds: Credentials | None) -> dict[str, Any]:
    """subprocess.Popen arguments that drop to ``creds``."""
    if creds is None:
        return {}
    return {"user": creds.uid, "group": creds.gid, "extra_groups": list(creds.groups)}


def _take_controlling_tty() -> None:
    # Runs in the child between fork and exec, after setsid(): stdin is the pty slave.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def user_credentials(user: UserInfo) -> Credentials:
    """uid, gid and supplementary groups (from the group database, if there is one)."""
    groups = os.getgrouplist(user.name, user.gid) if _has_group_db(user) else [user.gid]
    return Credentials(user.uid, user.gid, tuple(groups))


def _has_group_db(user: UserInfo) -> bool:
    try:
        grp.getgrgid(user.gid)
        pwd.getpwnam(user.name)
    except KeyError:
        return False
    return True
