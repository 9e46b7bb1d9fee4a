"""The archive's own errors; each carries the exit code the command line turns it into."""

from __future__ import annotations


class ArchiveError(Exception):
    """Base of every error the archive raises on purpose."""

    exit_code = 2


class BadInput(ArchiveError):
    """The caller asked for something malformed or forbidden (exit 2)."""

    exit_code = 2


class NotFound(ArchiveError):
    """An unknown document, or one that did not exist at the requested time (exit 3)."""

    exit_code = 3


class Damaged(ArchiveError):
    """Stored data failed a check: a hash mismatch, a broken chain (exit 1)."""

    exit_code = 1


class StorageError(ArchiveError):
    """The database could not be used: unreachable, newer schema, unexpected driver error."""

    exit_code = 2


class NoArchive(StorageError):
    """No archive at that URL or path, where a command only reads (it never creates one)."""


class Conflict(StorageError):
    """Another writer took the same sequence number first; the unit of work may be retried."""


class Locked(StorageError):
    """The database stayed locked by another writer for longer than the busy timeout."""
