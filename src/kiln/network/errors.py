"""Errors of the sandbox network (every error :mod:`kiln.network` raises is one of these).

    NetworkError                  root of everything this package raises (raised as
    │                             such only for a call on a closed Network)
    ├── InvalidInput              a bad config value or argument (subnet, /24, names, MAC,
    │                             an IP outside the pool), rejected before any I/O
    ├── AddressError              an IP pool conflict: the address belongs to another owner,
    │   │                         or the owner already holds a different address
    │   └── PoolExhausted         no free address left in .2-.254
    ├── NamespaceNotFound         the named network namespace does not exist
    ├── ToolMissing               a required program (``iptables``, ``ip``) is not installed
    └── OperationFailed           the kernel refused a netlink request, a command failed,
                                  or an interface is in a state we will not touch (for
                                  example a non-bridge device under the bridge's name)

Foreign exceptions (pyroute2's ``NetlinkError``, ``subprocess.CalledProcessError``,
``OSError`` from ``setns``) are translated once, where the call is made, and chained
with ``from``.

One deliberate exception to the rule: :func:`kiln.network.open_connection_in`
lets connection failures (``ConnectionRefusedError``, ``TimeoutError``, any
``OSError`` from ``connect``) through unchanged, exactly like
``asyncio.open_connection``, so a caller's "is the guest up yet?" retry loop is the
same with and without a namespace. Only namespace problems become NetworkErrors.
"""

from __future__ import annotations


class NetworkError(Exception):
    """Root of every error raised by :mod:`kiln.network`."""


class InvalidInput(NetworkError):
    """A config value or argument that is not acceptable; nothing was touched."""


class AddressError(NetworkError):
    """An IP pool conflict (address owned by someone else, owner already has one)."""


class PoolExhausted(AddressError):
    """Every address of the pool is allocated."""


class NamespaceNotFound(NetworkError):
    """The named network namespace (``/run/netns/NAME``) does not exist."""


class ToolMissing(NetworkError):
    """A program kiln needs (``iptables``, ``ip``) is not on ``PATH``."""


class OperationFailed(NetworkError):
    """The kernel or a command refused an operation; the cause is chained."""
