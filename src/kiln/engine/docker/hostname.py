"""A running container's host name, changed after Docker fixed it at create.

Docker has no call for it (``docker update`` cannot, the name is in the
container's config), and the sandbox cannot do it itself: ``sethostname``
needs CAP_SYS_ADMIN in the container, which no sandbox gets (its root could
then mount, and Docker's seccomp profile would let it make user namespaces).
The host can: a thread of its own joins the container's UTS namespace
(``setns``; root on the host) and sets the name there, then ends, taking its
namespace with it; and the two files Docker made from the old name and
bind-mounts into the container, ``/etc/hostname`` and ``/etc/hosts``, are
rewritten in place (a bind-mounted file is its inode: a replaced file would not
be seen).

runc only: a runsc container's namespaces are gVisor's, inside its sentry,
where no host thread can join them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any, Final

from kiln.images.initramfs import is_static_elf

_CLONE_NEWUTS: Final = 0x04000000
#: Where a container that gets its name by :func:`set_hostname_by_exec` has the host's
#: static busybox (a read-only bind mount).
SETTER: Final = "/usr/lib/kiln/busybox"


def set_hostname(pid: int, hostname: str) -> None:
    """``sethostname`` in the UTS namespace of process ``pid``. Raises OSError."""
    failure: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, _CLONE_NEWUTS) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns(CLONE_NEWUTS) of {pid}: {os.strerror(err)}")
            finally:
                os.close(fd)
            socket.sethostname(hostname)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    # setns moves only the calling thread: a thread of its own, which then ends,
    # so no thread of the daemon is ever left in a sandbox's namespace.
    thread = threading.Thread(target=work, name=f"sethostname {pid}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


@functools.cache
def static_busybox() -> Path | None:
    """The host's busybox if it is a static binary (it runs in any container without
    a library of the container's), else None."""
    found = shutil.which("busybox")
    if found is None:
        return None
    path = Path(found).resolve()
    try:
        return path if is_static_elf(path.read_bytes()) else None
    except OSError:
        return None


def set_hostname_by_exec(client: Any, container: str, hostname: str) -> None:
    """``sethostname`` in a running container by a privileged ``docker exec`` of
    :data:`SETTER` (see the module docstring). Raises OSError; the docker SDK's
    errors pass through."""
    api = client.api
    exec_id = api.exec_create(
        container, [SETTER, "hostname", hostname], privileged=True, user="root"
    )["Id"]
    output = api.exec_start(exec_id)
    code = api.exec_inspect(exec_id).get("ExitCode")
    if code != 0:
        text = output.decode(errors="replace").strip() if isinstance(output, bytes) else output
        raise OSError(f"hostname {hostname} in container {container} exited {code}: {text}")


def settable(runtime: str) -> bool:
    """Whether a running container of ``runtime`` can get a new host name here."""
    return runtime == "runc" or static_busybox() is not None


def setter_mount(runtime: str) -> Path | None:
    """What a container of ``runtime`` that will be renamed needs bind-mounted at
    :data:`SETTER` (None: nothing, its name is set from a host thread)."""
    return None if runtime == "runc" else static_busybox()


def rename(
    runtime: str, client: Any, attrs: dict[str, Any], pid: int, *, old: str, new: str
) -> None:
    """Host name ``old`` → ``new`` in a running container (``inspect`` ``attrs``; its
    main process ``pid``): the name in its UTS namespace, then its two files.
    Raises OSError; the docker SDK's errors pass through."""
    if runtime == "runc":
        set_hostname(pid, new)
    else:
        set_hostname_by_exec(client, attrs["Id"], new)
    rewrite_files(attrs, old, new)


def rewrite_files(attrs: dict[str, Any], old: str, new: str) -> None:
    """``/etc/hostname`` and ``/etc/hosts`` of the container (``inspect`` ``attrs``)
    with ``new`` for the host name ``old``. Raises OSError."""
    hostname_path = attrs.get("HostnamePath")
    if hostname_path:
        _write_in_place(hostname_path, f"{new}\n")
    hosts_path = attrs.get("HostsPath")
    if hosts_path:
        with open(hosts_path) as f:
            lines = f.read().splitlines()
        fixed = [" ".join(new if w == old else w for w in line.split()) for line in lines]
        if fixed != lines:
            _write_in_place(hosts_path, "".join(f"{line}\n" for line in fixed))


def _write_in_place(path: str, text: str) -> None:
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
