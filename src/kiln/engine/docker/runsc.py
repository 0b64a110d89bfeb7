"""gVisor's runsc as a dockerd runtime, and the workaround this host needs for it.

runsc releases before mid-2024 decide "am I in the root network namespace?" by
whether ``/proc/sys/net/core/rmem_default`` exists (gVisor issue 10704). Newer
kernels show that file in every network namespace, so every container with
gVisor's own network stack (``--network=sandbox``, the default) fails to start
with "cannot run with network enabled in root network namespace" -- even with
``docker run --network none``, which still gives the container a namespace with
``lo``. Debian bookworm's runsc (0.0~20221219) on these hosts' 6.x kernel does
exactly that.

The ways around it, measured here: ``--network=host`` runs but exposes the
host kernel's network stack to the sandbox and makes runsc refuse checkpoints
("checkpoint not supported when using hostinet"); ``--network=none`` keeps
checkpoints but leaves the sandbox without a network. So where the check
misfires runsc is registered through :func:`runsc_wrapper`: the subcommands
that set the network up (``start``, ``restore``) run in a private mount
namespace with an empty tmpfs over ``/proc/sys/net``, the check sees no file,
and the sandbox keeps gVisor's network stack, its isolation and
checkpoint/restore. Everything else goes straight to runsc.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

#: The first gVisor release date whose runsc no longer trips over issue 10704.
RUNSC_FIXED_RELEASE: Final = 20240901
#: runsc subcommands that configure the sandbox network (and so run the root-netns check).
NETWORK_SUBCOMMANDS: Final = ("start", "restore", "run", "do")


def daemon_json(runsc: str | None, runsc_args: Sequence[str] = ()) -> dict[str, Any]:
    """The contents of dockerd's ``daemon.json``: runsc as a runtime, if there is one."""
    if runsc is None:
        return {}
    entry: dict[str, Any] = {"path": runsc}
    if runsc_args:
        entry["runtimeArgs"] = list(runsc_args)
    return {"runtimes": {"runsc": entry}}


def runsc_wrapper(runsc: str) -> str:
    """A ``/bin/sh`` script that runs ``runsc``, hiding ``/proc/sys/net`` where it must.

    Only the network-setup subcommands pay for the extra mount namespace (a few
    ms); ``create``, ``exec``, ``state``, ``kill``, ``pause``, ``checkpoint``...
    go straight to runsc. The tmpfs goes over ``/proc/sys/net`` rather than
    ``.../core``: runsc looks after entering the container's network namespace,
    and the kernel drops a mount on a per-namespace sysctl directory then.
    """
    prog = shlex.quote(runsc)
    patterns = "|".join(f'*" {sub} "*' for sub in NETWORK_SUBCOMMANDS)
    inner = 'mount -t tmpfs -o size=4k,mode=0555 kiln-runsc /proc/sys/net && exec "$0" "$@"'
    return (
        "#!/bin/sh\n"
        "# Written by kiln (kiln.engine.docker.runsc) on every dockerd start.\n"
        "# runsc before 2024-08 takes /proc/sys/net/core/rmem_default as proof that it\n"
        "# runs in the root network namespace (gVisor issue 10704); this kernel shows\n"
        "# the file in every namespace. Network setup runs without /proc/sys/net.\n"
        'case " $* " in\n'
        f"{patterns})\n"
        f"  exec unshare --mount --propagation slave -- /bin/sh -c '{inner}' {prog} \"$@\" ;;\n"
        "esac\n"
        f'exec {prog} "$@"\n'
    )


def runsc_release_date(version_output: str) -> int | None:
    """``20221219`` from ``runsc --version`` output (Debian's ``0.0~20221219.0``,
    upstream's ``release-20240807.0``); ``None`` if there is no date in it."""
    match = re.search(r"(?<!\d)(20\d{2})(\d{2})(\d{2})(?!\d)", version_output)
    if match is None:
        return None
    year, month, day = (int(g) for g in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return year * 10000 + month * 100 + day


def needs_netns_workaround(kernel_shows_rmem_default: bool, runsc_date: int | None) -> bool:
    """Whether runsc must run through :func:`runsc_wrapper`.

    ``kernel_shows_rmem_default``: a fresh network namespace has
    ``/proc/sys/net/core/rmem_default``. An undated runsc is assumed old.
    """
    if not kernel_shows_rmem_default:
        return False
    return runsc_date is None or runsc_date < RUNSC_FIXED_RELEASE


@functools.cache
def kernel_shows_rmem_default_everywhere() -> bool:
    """Whether a fresh network namespace has ``/proc/sys/net/core/rmem_default``."""
    try:
        done = subprocess.run(
            ["unshare", "--net", "--", "test", "-e", "/proc/sys/net/core/rmem_default"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def runsc_version(runsc: str) -> str:
    """``runsc --version`` output, or ``""`` if it cannot be run."""
    try:
        done = subprocess.run(
            [runsc, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def runsc_root(exec_root: Path, namespace: str = "moby") -> Path:
    """Where runsc keeps its container state under dockerd (containerd's runc shim
    runs it with ``--root EXEC_ROOT/runtime-runc/NAMESPACE``)."""
    return exec_root / "runtime-runc" / namespace


def clear_checkpointed_state(runsc: str, root: Path, container_id: str) -> bool:
    """After ``docker checkpoint create`` (exit): drop runsc's stale state; True if there was.

    containerd pauses a task before it checkpoints it and resumes it after; once
    the sandbox has exited, the resume fails. For a container that was itself
    restored from a checkpoint, runsc 0.0~20221219 then keeps it "paused" in its
    state file, the shim cannot delete the task, and the next start fails with
    "id already in use" -- measured: the second checkpoint/restore cycle of a
    container always failed. ``runsc delete --force`` clears it.
    """
    base = [runsc, "--root", str(root)]
    try:
        state = subprocess.run(
            [*base, "state", container_id], capture_output=True, text=True, timeout=30, check=False
        )
        if state.returncode != 0 or json.loads(state.stdout).get("status") == "stopped":
            return False
        subprocess.run(
            [*base, "delete", "--force", container_id],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return False
    return True
