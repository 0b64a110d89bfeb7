"""The kiln guest agent: PID 1 of every sandbox, and the host's only way in.

Stdlib only (it is packed with :mod:`kiln.protocol` into one zipapp, see
:mod:`kiln.guest.build`). Run it with ``python -m kiln.guest``; ``--test-mode``
serves Unix sockets as a plain process, without any PID 1 duty.

Modules, one concept each:

- ``agent``: listeners, authentication, dispatch of control/forward connections
- ``execution``: piped exec (pipes, process group, STDIN/KILL, sync before EXIT)
- ``sessions``: TTY sessions (pty, scrollback, attach/detach, idle timer)
- ``processes``: the process table: background processes and TTY sessions by pid
- ``output``: the kept output (stdout/stderr log) every reader attaches to
- ``files``: read/write/stat/ls
- ``forward``: TCP port forwarding
- ``process``: spawning children, pidfd exit watching, the orphan reaper
- ``fdio``: asyncio over raw pipe/pty descriptors
- ``context``: what every handler shares (settings, users, environment, activity)
- ``config``: the config drive / kernel command line model
- ``pid1``: mounts, config drive (and the template wait), hostname, power off (VM mode only)
- ``netconf``: eth0's address, MAC and default route by ioctl
- ``reidentify``: a fork's clone taking its own identity (frame or config drive)
- ``forkframe``: the Ethernet frames that bring a clone its identity (shared with the host)
- ``build``: the zipapp builder
- ``errors``: the exception tree (root: :class:`GuestError`)

Wire choices the protocol leaves open (documented where implemented):

- a new TTY session answers SESSION_INFO first (so the host learns its id);
  an attach always sends exactly one scrollback STDOUT frame, possibly empty;
- a client detached because another one attached gets ``EXIT -1``;
- EXEC_KILL answers ``EXIT 0`` once the session is gone (ERROR: unknown id);
- CLOCK_SET may carry ``"seed": "<hex>"`` (≤ 4096 bytes) mixed into the
  kernel RNG; in test mode CLOCK_SET is only acknowledged;
- a command that cannot start gets STDERR + EXIT 127 (not found) or 126
  (not executable, bad cwd, E2BIG, ...);
- ACTIVITY counts piped execs in flight, and readers of a process's output
  (PROC_ATTACH), as attached and running;
- PROC_INPUT is written only once all ``size`` bytes arrived (a dropped
  connection writes nothing); closing a TTY session's input sends Ctrl-D;
- the durability barriers (sync() before a piped EXIT, fsync of written files)
  are on in a VM and off in test mode (``--sync`` turns them on there).
"""

from .errors import ConfigError, GuestError, RequestError, SetupError

__all__ = ["ConfigError", "GuestError", "RequestError", "SetupError"]
