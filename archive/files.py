"""From the file system to versions: which files, under which keys, with which bytes.

A key is the path relative to the root with `/` separators. File names that are not valid
UTF-8 are refused rather than mangled, and the archive's own database files are never read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput

if TYPE_CHECKING:
    from .api import Archive, Recorded, TimeLike

BATCH_FILES = 1000
BATCH_BYTES = 64 << 20


def key_for(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """The document key of `path` under `root`; BadInput if it lies outside or is not UTF-8."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if relative == os.curdir or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise BadInput(f"{os.fsdecode(path)!r} is outside the root {os.fsdecode(root)!r}")
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(relative)
        raise BadInput(f"file name {shown!r} is not valid UTF-8; rename it to archive it") from None
    return relative.replace(os.sep, "/")


def absent(path: str | os.PathLike) -> bool:
    """No regular file at `path` (following symlinks, as ingest and watch read files): what
    a deletion means. An error other than "not found" (a folder we may not list) is not
    proof of absence."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False


class OwnFiles:
    """The archive's own database files, recognised under any path that leads to them: a
    folder reached through a symlink, or a symlink to one of them. A path is resolved only
    when its name is one of theirs or it is a symlink, so asking about every file is cheap.
    A hard link has a name of its own: `same_file` recognises it by its stat."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self._real = {os.path.realpath(p) for p in paths}
        self._names = {os.path.basename(p) for p in self._real}
        self._devs: set[int] | None = None  # the file systems they are on, once asked

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str | os.PathLike):
            return False
        path = os.fspath(path)
        if os.path.basename(path) not in self._names and not os.path.islink(path):
            return False
        return os.path.realpath(path) in self._real

    def same_file(self, st: os.stat_result) -> bool:
        """Whether a file, by its stat, is one of them under another name (a hard link).
        Only a file with more than one link, on the database's file system, can be, so most
        files cost no system call; the database files are looked at each time (a -wal file
        comes and goes)."""
        if st.st_nlink < 2 or st.st_dev not in self._devices():
            return False
        for path in self._real:
            try:
                own = os.stat(path)
            except OSError:
                continue
            if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
                return True
        return False

    def _devices(self) -> set[int]:
        if self._devs is None:
            found = set()
            for path in self._real:
                with suppress(OSError):
                    found.add(os.stat(os.path.dirname(path)).st_dev)
            self._devs = found
        return self._devs

    def regular(self, path: str | os.PathLike) -> bool:
        """A regular file (following symlinks) that is not one of them by any name. Errors
        are those of `Path.is_file`: a missing file or a symlink loop is no file, and any
        other (a name too long, a folder that may be listed but not entered) is raised."""
        if path in self:
            return False
        try:
            st = os.stat(path)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                return False
            raise
        except ValueError:  # a NUL in the name
            return False
        return stat.S_ISREG(st.st_mode) and not self.same_file(st)


def walk(paths: Iterable[str | os.PathLike], skip: OwnFiles) -> Iterator[Path]:
    """Every regular file named or below a named folder, sorted, without `skip`. A folder
    that cannot be listed is an error: what it holds is unknown (and must not look gone)."""

    def unlisted(error: OSError) -> None:
        where = os.fsdecode(error.filename) if error.filename else "a folder"
        raise BadInput(f"cannot list {where}: {error.strerror or error}")

    for given in paths:
        if not os.fspath(given):
            raise BadInput("an empty path (an unset variable?): give the file or folder")
        path = Path(os.path.abspath(given))
        if path.is_dir():
            for folder, subdirs, names in os.walk(path, onerror=unlisted):
                subdirs.sort()
                for name in sorted(names):
                    candidate = Path(folder, name)
                    if skip.regular(candidate):
                        yield candidate
        elif path.is_file():
            if path in skip or skip.same_file(path.stat()):  # named: say why it is not read
                raise BadInput(f"{os.fsdecode(given)!r} is the archive's own database file")
            yield path
        elif path.exists():
            raise BadInput(f"{os.fsdecode(given)!r} is not a regular file or folder")
        else:
            raise BadInput(f"no such file or folder: {os.fsdecode(given)!r}")


def ingest(
    arc: Archive,
    paths: Iterable[str | os.PathLike],
    *,
    root: str | os.PathLike | None = None,
    at: TimeLike | None = None,
    deletions: bool = False,
) -> list[Recorded]:
    """Record the current content of files; with `deletions`, also record as deleted every
    archived document under the given folders that is gone."""
    from .api import Version, to_us

    root = Path(os.path.abspath(root if root is not None else os.curdir))
    paths = list(paths)
    at_us = to_us(at)
    skip = OwnFiles(arc.database_files())
    # Check every name before recording anything: bad input must not half-ingest.
    keyed = [(key_for(p, root), p) for p in walk(paths, skip)]
    unreadable = next((p for _key, p in keyed if not os.access(p, os.R_OK)), None)
    if unreadable is not None:  # found now, not after the first batches were committed
        why = "Permission denied" if unreadable.exists() else "No such file or directory"
        raise BadInput(f"cannot read {unreadable}: {why}")
    prefixes = [_folder_prefix(p, root) for p in paths if Path(p).is_dir()]
    results: list[Recorded] = []
    batch: list[Version] = []
    size = 0
    for key, path in keyed:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadInput(f"cannot read {path}: {error.strerror}") from None
        batch.append(Version(key, data, at_us))
        size += len(data)
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            results += arc.record_many(batch)
            batch, size = [], 0
    if deletions:
        present = {key for key, _ in keyed}
        for prefix in prefixes:
            # Gone means no regular file there, as the watcher decides: one the walk did not
            # list (under a symlinked folder, which it does not follow) is no deletion.
            gone = [
                k
                for k in arc.live_keys(prefix)
                if k not in present and absent(root / k.replace("/", os.sep))
            ]
            batch += [Version(k, None, at_us) for k in gone]
    results += arc.record_many(batch)
    return results


def _folder_prefix(folder: str | os.PathLike, root: Path) -> str:
    if os.path.abspath(folder) == str(root):
        return ""
    return key_for(folder, root) + "/"
