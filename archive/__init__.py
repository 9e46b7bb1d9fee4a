"""archive: an event-sourced archive that can prove what a document said at any moment.

The library front is `archive.Archive`; the command line (`archive.cli`) is a thin layer on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    ArchiveError,
    BadInput,
    Conflict,
    Damaged,
    Locked,
    NoArchive,
    NotFound,
    StorageError,
)

if TYPE_CHECKING:
    from .api import ABSENT, Archive, Recorded, Snapshot, Version

__all__ = [
    "ABSENT",
    "Archive",
    "ArchiveError",
    "BadInput",
    "Conflict",
    "Damaged",
    "Locked",
    "NoArchive",
    "NotFound",
    "Recorded",
    "Snapshot",
    "StorageError",
    "Version",
]


def __getattr__(name: str):
    # The API pulls in SQLAlchemy; import it on first use so `archive --help` stays quick.
    if name in ("ABSENT", "Archive", "Recorded", "Snapshot", "Version"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
