"""Who commands and file operations run as in a sandbox reached through the E2B API.

E2B's SDK expects the account ``user`` with home ``/home/user`` (an envd of
the version kiln reports lets the sandbox pick the default user: the SDK sends
no user unless the caller names one). kiln's images have ``sandbox`` instead,
and kiln's own defaults stay as they are: a sandbox created through the E2B API
asks its guest, on the config drive, for ``user`` as its default account, and
the guest creates it at boot (``kiln.guest.pid1.ensure_user``, on both
engines). The choice is stored with the sandbox (``SandboxConfig.user``), so a
sandbox made by kiln's own API and reached through E2B keeps ``sandbox``.
"""

from __future__ import annotations

from kiln.protocol import ROOT_USER, SANDBOX_USER
from kiln.store import Sandbox

#: The default account of a sandbox created through the E2B API.
E2B_USER = "user"


def default_user(sb: Sandbox) -> str:
    """The account commands and file operations run as when the client names none."""
    return sb.config.user or SANDBOX_USER


def home_of(user: str) -> str:
    """The home directory of an account kiln's guest has or creates (E2B's default
    working directory for commands)."""
    return "/root" if user == ROOT_USER else f"/home/{user}"
