"""The machines of ``FakeEngine(agents=ROOT)``: one real test-mode guest agent per sandbox.

A sandbox's "machine" is ``python -m kiln.guest --test-mode --reap-orphans`` in a
session of its own, serving Unix sockets. Every process of it (the agent and
everything it starts: the sandbox env carries the variable into every command)
has ``KILN_FAKE_SANDBOX=<its directory>`` in its environment. That is how its
processes are found again -- by a restarted engine, by cleanup, by a test -- as
QEMU is found by the directory on its command line, and how "everything of the
machine" is frozen, thawed or killed. On disk, per sandbox::

    ROOT/sandboxes/<id>/sandbox.json   its spec, the agent's token and pid
    ROOT/sandboxes/<id>/config.json    the agent's config (token, env, init)
    ROOT/sandboxes/<id>/work/          its working directory: the sandbox's files
    $KILN_TEST_SOCKDIR/kf-<hash>/      control.sock and forward.sock (a socket path
                                       has at most 107 bytes, so not under ROOT)

pause is SIGSTOP and resume SIGCONT of every process of it; there are no
snapshots: a stop kills them all and keeps ``work/``, a start boots a new agent.
Nothing here is asynchronous: the engine calls it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine.base import FileSpec, SandboxSpec

SRC = Path(__file__).resolve().parents[2] / "src"
SOCK_ROOT = Path(os.environ.get("KILN_TEST_SOCKDIR", "/tmp"))
MARKER_ENV = "KILN_FAKE_SANDBOX"
#: How long an agent may take to create its sockets (a cold Python start on a busy host).
BOOT_TIMEOUT = 20.0
KILL_TIMEOUT = 10.0

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Popen objects of agents this process started, kept until they are reaped: a Popen
# dropped while its process runs warns (ResourceWarning, an error in the tests).
_children: dict[int, subprocess.Popen[bytes]] = {}


def sandbox_id_ok(sandbox_id: str) -> bool:
    """A sandbox id that is safe as a directory name."""
    return _ID_RE.match(sandbox_id) is not None


def sandbox_dir(root: Path, sandbox_id: str) -> Path:
    return root / "sandboxes" / sandbox_id


def marker_of(root: Path, sandbox_id: str) -> str:
    """The value of KILN_FAKE_SANDBOX in every process of the sandbox."""
    return str(sandbox_dir(root, sandbox_id))


def socket_dir_of(marker: str) -> Path:
    """Where the sandbox's agent listens: fixed per sandbox, short enough for AF_UNIX."""
    return SOCK_ROOT / f"kf-{hashlib.sha256(marker.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------- /proc


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T, Z, ...); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _marker_in(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{MARKER_ENV}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        del _children[pid]


def marked_processes(prefix: str) -> dict[int, str]:
    """Living processes whose marker starts with ``prefix``: pid → marker."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        marker = _marker_in(pid)
        if marker is not None and marker.startswith(prefix) and _proc_state(pid) not in ("Z", "X"):
            found[pid] = marker
    return found


def processes_of(marker: str) -> list[int]:
    """Every living process of the sandbox with that marker."""
    return sorted(pid for pid, m in marked_processes(marker).items() if m == marker)


def alive(pid: int | None, marker: str) -> bool:
    """The agent ``pid`` of the sandbox runs (stopped counts; a zombie does not)."""
    if pid is None:
        return False
    _reap(pid)
    return _proc_state(pid) not in (None, "Z", "X") and _marker_in(pid) == marker


def stopped(pid: int) -> bool:
    """SIGSTOPped (job control stop)."""
    return _proc_state(pid) == "T"


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_all(marker: str, agent_pid: int | None = None) -> None:
    """SIGKILL every process of the sandbox (the agent first, so it starts no more)
    and wait until they are gone."""
    if agent_pid is not None and alive(agent_pid, marker):
        _signal_all([agent_pid], signal.SIGKILL)
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        pids = processes_of(marker)
        for pid in list(_children):
            _reap(pid)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {marker} survive SIGKILL: {pids}")
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.01)


def _wait_states(pids: list[int], stopped: bool) -> None:
    """Until every one of ``pids`` is stopped (or running again), or gone: a signal is
    delivered a moment after kill() returns, and a pause returns once it holds."""
    deadline = time.monotonic() + KILL_TIMEOUT
    pending = list(pids)
    while pending:
        pending = [p for p in pending if (_proc_state(p) == "T") is not stopped]
        pending = [p for p in pending if _proc_state(p) not in (None, "Z", "X")]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"processes {pending} did not {'stop' if stopped else 'continue'}")
        if pending:
            time.sleep(0.001)


def freeze(marker: str, agent_pid: int) -> None:
    """Stop the agent, then everything else of the sandbox (a cgroup freeze, roughly)."""
    _signal_all([agent_pid], signal.SIGSTOP)
    _wait_states([agent_pid], stopped=True)  # it starts nothing new from here on
    others = [p for p in processes_of(marker) if p != agent_pid]
    _signal_all(others, signal.SIGSTOP)
    _wait_states(others, stopped=True)


def thaw(marker: str, agent_pid: int) -> None:
    others = [p for p in processes_of(marker) if p != agent_pid]
    _signal_all(others, signal.SIGCONT)
    _signal_all([agent_pid], signal.SIGCONT)
    _wait_states([*others, agent_pid], stopped=False)


# ---------------------------------------------------------------------- records


def spec_to_json(spec: SandboxSpec) -> dict[str, Any]:
    return {
        "sandbox_id": spec.sandbox_id,
        "name": spec.name,
        "cpus": spec.cpus,
        "memory_mb": spec.memory_mb,
        "image": spec.image,
        "env": dict(spec.env),
        "init": spec.init,
        "keep_hot": spec.keep_hot,
        "engine": spec.engine,
        "runtime": spec.runtime,
    }


def spec_from_json(data: dict[str, Any]) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=str(data["sandbox_id"]),
        name=str(data["name"]),
        cpus=int(data["cpus"]),
        memory_mb=int(data["memory_mb"]),
        image=str(data["image"]),
        env=dict(data["env"]),
        init=data["init"],
        keep_hot=bool(data["keep_hot"]),
        engine=data["engine"],
        runtime=data["runtime"],
    )


@dataclass
class Machine:
    """One sandbox's agent: where it lives and, while it runs, its pid and token."""

    root: Path  # ROOT/sandboxes/<id>
    spec: SandboxSpec
    token: str = ""
    pid: int | None = None

    @property
    def marker(self) -> str:
        return str(self.root)

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def socket_dir(self) -> Path:
        return socket_dir_of(self.marker)

    @property
    def record(self) -> Path:
        return self.root / "sandbox.json"

    def save(self) -> None:
        data = {"spec": spec_to_json(self.spec), "token": self.token, "pid": self.pid}
        tmp = self.record.with_name(".sandbox.json.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.record)

    @classmethod
    def load(cls, root: Path) -> Machine | None:
        try:
            data = json.loads((root / "sandbox.json").read_text())
            return cls(root, spec_from_json(data["spec"]), str(data["token"]), data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def running(self) -> bool:
        return alive(self.pid, self.marker)


def _write_files(workdir: Path, files: tuple[FileSpec, ...]) -> None:
    for spec_file in files:
        path = Path(spec_file.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(spec_file.content)
        path.chmod(spec_file.mode)


def create(root: Path, spec: SandboxSpec) -> Machine:
    """The sandbox's directory, its spec files in it; not booted yet."""
    machine = Machine(sandbox_dir(root, spec.sandbox_id), spec)
    machine.root.mkdir(parents=True, mode=0o700)  # FileExistsError: a leftover
    machine.workdir.mkdir()
    _write_files(machine.workdir, spec.files)
    machine.save()
    return machine


def boot(machine: Machine) -> None:
    """Start a new agent for the sandbox; return once it listens."""
    token = secrets.token_hex(16)
    env = {**machine.spec.env, MARKER_ENV: machine.marker}
    config: dict[str, Any] = {"token": token, "env": env}
    if machine.spec.init:
        config["init"] = machine.spec.init
    config_path = machine.root / "config.json"
    config_path.write_text(json.dumps(config))
    sock_dir = machine.socket_dir
    shutil.rmtree(sock_dir, ignore_errors=True)  # stale sockets would look ready
    sock_dir.mkdir(mode=0o700)
    argv = [
        sys.executable,
        "-m",
        "kiln.guest",
        "--test-mode",
        "--socket-dir",
        str(sock_dir),
        "--config",
        str(config_path),
        "--workdir",
        str(machine.workdir),
        "--no-sync",
        # Orphans (setsid X &) stay below the agent, as in a VM.
        "--reap-orphans",
        "--log-level",
        "warning",
    ]
    env_of_agent = dict(os.environ, PYTHONPATH=str(SRC), **{MARKER_ENV: machine.marker})
    proc = subprocess.Popen(argv, env=env_of_agent, start_new_session=True)
    _children[proc.pid] = proc
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not ((sock_dir / "control.sock").exists() and (sock_dir / "forward.sock").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_all(machine.marker, proc.pid)
            raise RuntimeError(f"the agent of {machine.spec.sandbox_id} did not start")
        time.sleep(0.01)
    machine.token, machine.pid = token, proc.pid
    machine.save()


def shutdown(machine: Machine) -> None:
    """End every process of the sandbox; its files stay."""
    kill_all(machine.marker, machine.pid)
    machine.pid = None
    shutil.rmtree(machine.socket_dir, ignore_errors=True)
    if machine.root.is_dir():
        machine.save()


def remove(root: Path, sandbox_id: str) -> list[str]:
    """Kill and delete whatever exists of the sandbox; a line per thing removed."""
    marker = marker_of(root, sandbox_id)
    removed = [f"sandbox {sandbox_id}: pid {pid}" for pid in processes_of(marker)]
    kill_all(marker)
    sock_dir = socket_dir_of(marker)
    if sock_dir.exists():
        shutil.rmtree(sock_dir, ignore_errors=True)
        removed.append(f"sandbox {sandbox_id}: sockets {sock_dir}")
    directory = sandbox_dir(root, sandbox_id)
    if directory.exists():
        shutil.rmtree(directory)
        removed.append(f"sandbox {sandbox_id}: directory {directory}")
    return removed


def leftovers(root: Path, sandbox_id: str) -> list[str]:
    """What exists of the sandbox on this host: processes, socket dir, directory."""
    marker = marker_of(root, sandbox_id)
    found = [f"process {pid}" for pid in processes_of(marker)]
    for path in (socket_dir_of(marker), sandbox_dir(root, sandbox_id)):
        if path.exists():
            found.append(f"directory {path}")
    return found


def sandbox_ids(root: Path) -> Iterator[str]:
    """Sandboxes with a directory or a living process under ``root``."""
    base = root / "sandboxes"
    seen: set[str] = set()
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            seen.add(entry.name)
            yield entry.name
    for marker in sorted(set(marked_processes(f"{base}/").values())):
        name = Path(marker).name
        if name not in seen:
            seen.add(name)
            yield name


def kill_everything(root: Path) -> None:
    """Kill every process of every sandbox under ``root`` (a test's last cleanup)."""
    for marker in set(marked_processes(f"{root / 'sandboxes'}/").values()):
        kill_all(marker)
