"""Errors of :mod:`kiln.archive` (the tree is drawn in the package docstring)."""

from __future__ import annotations


class ArchiveError(Exception):
    """Root of the archive errors."""


class UnsafeArchive(ArchiveError):
    """The archive has a member that would land outside its destination, a kind of
    member that is not copied, or is not a well-formed tar stream."""
