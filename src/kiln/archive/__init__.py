"""Tar archives crossing the sandbox boundary (``kiln cp``), checked on the way.

:mod:`.rules` decides whether one member of an archive may be extracted into a
destination (no absolute names, no ``..`` leaving it, no symlink pointing out
of it, no path through a symlink of the same archive). :mod:`.scan` applies the
rules to a tar stream as it passes through the daemon, without buffering it,
and gives every member the sandbox user as owner. :mod:`.local` packs local
files into a tar stream and extracts one safely, for the command line.

Errors::

    ArchiveError          root
    └── UnsafeArchive     a member the rules refuse, or a malformed stream
"""

from __future__ import annotations

from .errors import ArchiveError, UnsafeArchive
from .rules import MemberRules
from .scan import TarScanner

__all__ = ["ArchiveError", "MemberRules", "TarScanner", "UnsafeArchive"]
