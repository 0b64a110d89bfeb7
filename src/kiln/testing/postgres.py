"""A throwaway PostgreSQL server for tests and benchmarks (Debian's ``postgresql``).

:meth:`PostgresServer.start` runs ``initdb`` into a fresh temporary directory
and starts ``postgres`` on a free port of 127.0.0.1 only (so it works inside a
test's network namespace), with trust authentication for the superuser
``kiln`` and durability off (``fsync``, ``synchronous_commit``: a test server
lives for one run). ``initdb`` refuses to run as root, so under root the
server runs as the ``postgres`` user that Debian's package creates.
:meth:`PostgresServer.stop` (also on ``with`` exit) shuts it down and removes
the directory. ``scripts/bootstrap`` installs the package; nothing here
downloads anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg

#: The superuser initdb creates (trust authentication on 127.0.0.1).
SUPERUSER = "kiln"
#: Settings for a server that lives for one test run: speed over durability.
TEST_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
    "shared_buffers=32MB",
)
START_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries: run ``scripts/bootstrap`` (installs ``postgresql``)."""


def find_bindir() -> Path:
    """The directory with ``initdb`` and ``postgres``: ``$KILN_PG_BINDIR``, else the
    newest ``/usr/lib/postgresql/<version>/bin`` (Debian), else ``$PATH``."""
    override = os.environ.get("KILN_PG_BINDIR")
    if override:
        return Path(override)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresNotInstalled(
        "PostgreSQL server binaries (initdb, postgres) not found: run scripts/bootstrap,"
        " which installs Debian's postgresql package"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One running ``postgres``; :meth:`url` names a database on it."""

    def __init__(
        self, root: Path, proc: subprocess.Popen[bytes], port: int, host: str | None = None
    ) -> None:
        self.root = root
        self.proc = proc
        self.port = port
        #: The address besides 127.0.0.1 it listens on (None: loopback only).
        self.host = host

    @classmethod
    def start(cls, host: str | None = None, allow: str | None = None) -> Self:
        """``host``: an address of this network namespace to listen on as well (for
        other namespaces the test made, e.g. a cluster's nodes), ``allow``: the
        subnet they connect from (trust authentication, as on loopback)."""
        bindir = find_bindir()
        root = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
        runas = _run_as()
        try:
            if runas is not None:
                os.chown(root, runas.pw_uid, runas.pw_gid)
            _initdb(bindir, root, runas)
            if allow is not None:
                with open(root / "data" / "pg_hba.conf", "a") as hba:
                    hba.write(f"host all all {allow} trust\n")
            for _attempt in range(3):  # another process may take the port we picked
                port = _free_port()
                proc = _postgres(bindir, root, port, runas, host)
                if _wait_ready(proc, port, root):
                    return cls(root, proc, port, host)
            raise RuntimeError(f"postgres did not start:\n{_log_tail(root)}")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    def url(self, dbname: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://{SUPERUSER}@{host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a random name by default); return its URL."""
        name = name or f"kiln_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database ``url`` names, disconnecting whoever still uses it."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database for the block, dropped afterwards."""
        url = self.create_database()
        try:
            yield url
        finally:
            self.drop_database(url)

    def restart(self) -> None:
        """Stop the server (every connection drops) and start it again on the same port."""
        self._shutdown()
        proc = _postgres(find_bindir(), self.root, self.port, _run_as(), self.host)
        if not _wait_ready(proc, self.port, self.root):
            raise RuntimeError(f"postgres did not restart:\n{_log_tail(self.root)}")
        self.proc = proc

    def pause(self) -> None:
        """Stop the server without removing anything (calls fail until :meth:`resume`)."""
        self._shutdown()

    def resume(self) -> None:
        proc = _postgres(find_bindir(), self.root, self.port, _run_as(), self.host)
        if not _wait_ready(proc, self.port, self.root):
            raise RuntimeError(f"postgres did not start again:\n{_log_tail(self.root)}")
        self.proc = proc

    def stop(self) -> None:
        """Shut down and remove the data directory (idempotent)."""
        try:
            self._shutdown()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _shutdown(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _run_as() -> pwd.struct_passwd | None:
    """The user to run the server as: ``postgres`` under root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresNotInstalled(
            "running as root needs the 'postgres' user (from Debian's postgresql package):"
            " run scripts/bootstrap"
        ) from None


def _die_with_parent() -> None:
    """In the child, before exec: a fast shutdown when the test run dies, even by
    SIGKILL, so no server outlives it. Runs after the switch to the server's user,
    which would otherwise clear it. Linux sends it when the *thread* that started
    the server ends: start, restart and resume from a thread that stays (the main
    one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


def _popen_user(runas: pwd.struct_passwd | None) -> dict[str, object]:
    if runas is None:
        return {}
    return {"user": runas.pw_uid, "group": runas.pw_gid, "extra_groups": []}


def _initdb(bindir: Path, root: Path, runas: pwd.struct_passwd | None) -> None:
    result = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-locale",  # byte-order collation, as SQLite sorts
            "-E",
            "UTF8",
            "--no-sync",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        **_popen_user(runas),  # type: ignore[call-overload]
    )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stderr[-2000:]}")


def _postgres(
    bindir: Path, root: Path, port: int, runas: pwd.struct_passwd | None, host: str | None = None
) -> subprocess.Popen[bytes]:
    argv = [
        str(bindir / "postgres"),
        "-D",
        str(root / "data"),
        "-k",
        str(root),
        "-h",
        "127.0.0.1" if host is None else f"127.0.0.1,{host}",
        "-p",
        str(port),
    ]
    for setting in TEST_SETTINGS:
        argv += ["-c", setting]
    log = open(root / "postgres.log", "ab")  # noqa: SIM115 -- the child keeps it open
    try:
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            argv,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is the test runner's
            preexec_fn=_die_with_parent,  # noqa: PLW1509 -- started before any test thread
            **_popen_user(runas),
        )
    finally:
        log.close()
    return proc


def _wait_ready(proc: subprocess.Popen[bytes], port: int, root: Path) -> bool:
    """True once the server accepts connections; False if it exited (port taken)."""
    url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"postgres not ready within {START_TIMEOUT_S:.0f} s:\n{_log_tail(root)}")


def _log_tail(root: Path) -> str:
    try:
        return (root / "postgres.log").read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"
