"""Forgetting the connection-tracking entries of a sandbox address.

The firewall accepts ``ct state established,related`` before any policy rule, so
a flow the kernel tracks goes on whatever the rules say now. When an address
changes hands (a destroyed sandbox's address is the next sandbox's), every flow
tracked for it is deleted; when its sandbox's policy changes, the flows the
sandbox started are (not the host's to it: an exec stream or a proxied request
goes on). The next packet of a forgotten flow is new, and the current rules
judge it. Without this, a
sandbox could ride the established flows of the one that had its address
before (sending packets that match an entry's tuple), or keep talking to a
destination its new policy denies.

Best effort: a kernel without conntrack netlink, or a namespace that is gone,
is logged, never an error of the operation that asked (a destroy must go on).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection
from typing import Any

from pyroute2 import Conntrack

from .netns import netns_path, setns_net

log = logging.getLogger(__name__)


def _addresses(entry: Any, started_only: bool) -> set[str]:
    if started_only:
        orig = getattr(entry, "tuple_orig", None)
        return {orig.saddr} if orig is not None and orig.saddr else set()
    out: set[str] = set()
    for name in ("tuple_orig", "tuple_reply"):
        t = getattr(entry, name, None)
        if t is not None:
            out.update(a for a in (t.saddr, t.daddr) if a)
    return out


def forget_flows(netns: str | None, ips: Collection[str], *, started_only: bool = False) -> int:
    """Delete the tracked flows to or from ``ips`` in ``netns`` (None: the current
    namespace) -- with ``started_only``, only those ``ips`` started; how many were
    deleted. Blocking."""
    wanted = set(ips)
    if not wanted:
        return 0
    if netns is None:
        return _forget(wanted, started_only)
    # pyroute2 opens its socket on first use, wherever the using thread is then: the
    # whole job runs in a thread of its own that enters the namespace for good.
    done: list[int] = []

    def work() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns_net(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("conntrack: cannot enter %s: %s", netns, exc)
            return
        done.append(_forget(wanted, started_only))

    thread = threading.Thread(target=work, name=f"kiln-conntrack-{netns}", daemon=True)
    thread.start()
    thread.join()
    return done[0] if done else 0


def _forget(wanted: set[str], started_only: bool) -> int:
    try:
        ct = Conntrack()
    except OSError as exc:
        log.warning("conntrack: cannot open: %s", exc)
        return 0
    deleted = 0
    try:
        for entry in list(ct.dump_entries()):
            if _addresses(entry, started_only) & wanted:
                try:
                    ct.delete(entry)
                    deleted += 1
                except OSError as exc:  # ENOENT: it timed out meanwhile
                    log.debug("conntrack: deleting a flow of %s: %s", wanted, exc)
    except OSError as exc:
        log.warning("conntrack: cannot list the flows of %s: %s", sorted(wanted), exc)
    finally:
        ct.close()
    if deleted:
        log.debug("conntrack: forgot %d flows of %s", deleted, ", ".join(sorted(wanted)))
    return deleted
