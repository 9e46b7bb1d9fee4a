"""`archive watch`: the daemon that records every version of every file in some folders.

Design, in the order things happen:

* Observer threads (watchdog's native inotify observer, or the polling one) only append
  events to an in-memory inbox: an exception in a handler would kill the observer silently.
* One worker thread owns all state and is the only caller of the `Archive`. It first
  reconciles the archive with the folders (walk, hash, compare with the archive's current
  SHA-256 per key, record what differs and what is gone), then turns events into pending
  paths with a debounce deadline, sleeping on a condition until the next deadline (no
  polling loop). A due path is read only when it has been quiet for `debounce` seconds and
  its size and mtime did not change while it was read; whatever is due at once is recorded
  in one `record_many` transaction, and logged only after that returned (committed).
* Every version carries `expect`: the SHA-256 the worker believes is archived for its key
  (from the last scan of the archive and from its own committed results; ABSENT for none).
  Another writer (a second daemon on the same folder) that recorded in between makes it a
  "conflict": nothing is recorded, the worker reads that key's state from the archive again
  and re-reads the file after the debounce period. So a version read before another
  writer's newer one can never be committed after it, however long the write lock took.
  The belief is only ever refreshed before the file is (re-)read, never between a read and
  its commit: that ordering is what makes the guard sound.
* Moves are recorded as they arrive (a move is atomic; its content is read later through
  the usual debounce): a live document moved to a free name becomes a `renamed` event,
  anything else is a change of the target plus a possible deletion of the source. A moved
  folder's documents are renamed in one transaction (`rename_many`), one by one only where
  a target name is taken.
* The main thread waits for SIGTERM/SIGINT on a self-pipe and supervises: a dead observer
  (or a watched folder deleted and created again) is restarted and followed by a rescan.
  On a signal it stops the observer, lets the worker record everything pending, and
  returns (exit 0).
* A periodic rescan, and one as soon as watchdog logs an inotify queue overflow (at most
  one a second during a storm), catches what notifications missed; a per-path stat cache
  (size, mtime, ctime, inode) means only files whose stat changed are hashed again.

Nothing here is needed for durability: the archive is the only state that matters, and a
restart reconciles it with the folders, so a SIGKILL at any moment loses nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import logging
import os
import re
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from .api import ABSENT, Archive, Recorded, Version, check_key
from .errors import BadInput, NotFound, StorageError
from .events import DELETED
from .files import OwnFiles, absent, key_for

T = TypeVar("T")

log = logging.getLogger("archive.watch")

# Editor swap, backup, lock and temporary files; hidden files are ignored separately.
DEFAULT_IGNORES = (".*.swp", "*~", ".#*", "#*#", "4913", "*.tmp")

# Only the events that can change what a file holds: no opens, no close-without-write
# (our own reads would wake us up again), no directory mtime changes.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,  # chmod may make an unreadable file readable; touch -m changes mtime
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
EVENT_TYPE_ATTRIB = "attrib"

BATCH_FILES = 1000  # versions per transaction
BATCH_BYTES = 64 << 20
SUPERVISE_EVERY = 1.0  # seconds between observer health checks
POLL_INTERVAL = 1.0  # the polling observer's period
MAX_BACKOFF = 30.0
RESCAN_GAP = 1.0  # seconds between requested rescans (inotify overflow, observer restart)
FINAL_ROUNDS = 5  # passes over pending paths when stopping (conflicts put paths back)
OVERFLOW_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")

Signature = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


def signature(st: os.stat_result) -> Signature:
    """What must stay equal for a file's bytes to be assumed unchanged. ctime is included
    because an edit that restores the mtime (touch -r, rsync -t) still moves it."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


# -- which paths are ours, under which keys -------------------------------------------------


class Rules:
    """Folders, root and ignore rules: turns a path into its document key, or None."""

    def __init__(
        self,
        dirs: Sequence[str],
        root: str,
        ignore: Sequence[str],
        database_files: Iterable[Path],
    ):
        self.dirs = list(dirs)
        self.root = root
        self.user_globs = tuple(ignore)
        self.database_files = OwnFiles(database_files)
        self._warned: set[str] = set()
        self._root_prefix = root.rstrip(os.sep) + os.sep
        # Compiled once: a rescan asks about every file, and inotify about every write.
        self._user_ignored = _glob_regex(self.user_globs)

    @classmethod
    def build(
        cls, arc: Archive, dirs: Sequence[str], root: str | None, ignore: Sequence[str]
    ) -> Rules:
        """Validate the folders. Keys are relative to `root`; without it, to the folder when
        one is watched (so `watch DIR` and `ingest --root DIR DIR` agree), else to the
        current directory, as `archive ingest` does."""
        if not dirs:
            raise BadInput("give at least one folder to watch")
        absolute = []
        for d in dirs:
            if not os.fspath(d):
                raise BadInput("an empty folder name (an unset variable?): give the folder")
            path = os.path.abspath(d)
            if not os.path.isdir(path):
                what = "not a folder" if os.path.lexists(path) else "no such folder"
                raise BadInput(f"{what}: {os.fsdecode(d)!r}")
            absolute.append(path)
        # A folder inside another watched folder adds nothing but duplicate events.
        absolute = sorted(set(absolute))
        kept = [d for d in absolute if not any(_inside(d, other) for other in absolute)]
        if root is None:
            root = kept[0] if len(absolute) == 1 else os.curdir
        root = os.path.abspath(root)
        for d in kept:
            if d != root and not _inside(d, root):
                raise BadInput(f"folder {d!r} is outside the root {root!r}: give --root")
        return cls(kept, root, ignore, arc.database_files())

    def watched_dir(self, path: str) -> str | None:
        for d in self.dirs:
            if path == d or _inside(path, d):
                return d
        return None

    def _relative_parts(self, path: str) -> list[str] | None:
        d = self.watched_dir(path)
        if d is None:
            return None
        return [] if path == d else path[len(d.rstrip(os.sep)) + 1 :].split(os.sep)

    def skip_dir(self, path: str) -> bool:
        """A folder whose whole content is ignored (hidden, or matching a user glob)."""
        parts = self._relative_parts(path)
        if parts is None:
            return True
        return any(p.startswith(".") for p in parts) or (
            self._user_ignored is not None and any(self._user_ignored.match(p) for p in parts)
        )

    def key_of(self, path: str) -> str | None:
        """The key of a file we archive, or None: outside the folders, ignored, the
        archive's own database, or a name that cannot be a key (logged once). The key is
        the one `archive.files.key_for` gives (a test checks), without its system calls."""
        path = os.path.abspath(path)
        parts = self._relative_parts(path)
        if not parts or path in self.database_files:
            return None
        if any(p.startswith(".") for p in parts) or _DEFAULT_IGNORED.match(parts[-1]):
            return None
        if not path.startswith(self._root_prefix):
            return self.refuse(path, f"{path!r} is outside the root {self.root!r}")
        relative = path[len(self._root_prefix) :]
        try:
            relative.encode("utf-8")
            key = check_key(relative.replace(os.sep, "/"))
        except UnicodeEncodeError:
            shown = os.fsencode(relative)
            return self.refuse(path, f"file name {shown!r} is not valid UTF-8; rename it")
        except BadInput as error:
            return self.refuse(path, str(error))
        if self._user_ignored is not None and (
            any(self._user_ignored.match(p) for p in parts) or self._user_ignored.match(key)
        ):
            return None
        return key

    def refuse(self, path: str, why: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            log.warning("skipping %s", why)

    def prefix_of(self, folder: str) -> str | None:
        """The key prefix of a watched, not ignored folder ('' for the root itself)."""
        folder = os.path.abspath(folder)
        if self.skip_dir(folder):
            return None
        if folder == self.root:
            return ""
        try:
            return check_key(key_for(folder, self.root)) + "/"
        except BadInput:
            return None

    def path_of(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def owns(self, key: str) -> bool:
        """Whether `key` is one this watcher archives (its path is watched, not ignored):
        only such a document may be recorded deleted when its file is gone."""
        return self.key_of(self.path_of(key)) == key

    def walk(self, folder: str, blocked: list[str]) -> Iterator[str]:
        """Every file path under `folder` that is not in an ignored folder. Folders that
        cannot be listed go to `blocked`: what they hold is unknown, not gone."""

        def on_error(error: OSError) -> None:
            where = error.filename if isinstance(error.filename, str) else folder
            log.warning("cannot list %s: %s", where, error.strerror or error)
            blocked.append(where)

        for parent, subdirs, names in os.walk(folder, onerror=on_error):
            subdirs[:] = [s for s in subdirs if not self.skip_dir(os.path.join(parent, s))]
            for name in names:
                yield os.path.join(parent, name)


def _glob_regex(globs: Sequence[str]) -> re.Pattern[str] | None:
    """One regular expression for shell globs, matched against a whole name (fnmatchcase)."""
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


_DEFAULT_IGNORED = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in DEFAULT_IGNORES))


def _inside(path: str, folder: str) -> bool:
    """Strictly below `folder` (both absolute and normalised)."""
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


# -- reading a file that may be changing -----------------------------------------------------


@dataclass(slots=True)
class Read:
    """What reading a due path gave: bytes, or why not."""

    outcome: str  # "data", "gone", "unstable", "skip"
    data: bytes = b""
    st: os.stat_result | None = None
    retry_in: float = 0.0


GONE = Read("gone")
SKIP = Read("skip")


# -- the worker ------------------------------------------------------------------------------


@dataclass(slots=True)
class Pending:
    deadline: float  # monotonic time at which the path is due
    first_seen: float  # when it became pending: bounds how long a busy file waits


class _Enqueue(FileSystemEventHandler):
    """The only handler: it appends and returns, so it cannot kill the observer thread."""

    def __init__(self, post: Callable[[FileSystemEvent], None]):
        self._post = post

    def dispatch(self, event: FileSystemEvent) -> None:
        self._post(event)


class _OverflowAlarm(logging.Handler):
    """watchdog only logs an inotify queue overflow; this turns the log record into a
    rescan request."""

    def __init__(self, on_overflow: Callable[[], None]):
        super().__init__(logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._on_overflow()


class Watcher:
    """The worker's state and logic. Only `post`, `request_*` and `interrupt` may be called
    from other threads."""

    def __init__(
        self,
        arc: Archive,
        rules: Rules,
        *,
        debounce: float,
        rescan: float,
        use_mtime: bool,
        polling: bool,
    ):
        self.arc = arc
        self.rules = rules
        self.debounce = debounce
        self.rescan_every = rescan
        self.use_mtime = use_mtime
        self.polling = polling
        self.patient = True  # wait out a database outage (not in --once)
        # A file written without pause is still recorded this often.
        self.max_delay = max(60.0, 10 * debounce)
        self.cond = threading.Condition()
        self.inbox: list[FileSystemEvent] = []
        self.rescan_wanted = False
        self.last_rescan = -float("inf")  # monotonic end of the last reconcile
        self.stopping = False  # set under `cond` once the observer has stopped
        self.interrupted = False  # set from a signal handler: cut a long walk short
        self.failed: str | None = None
        self.pending: dict[str, Pending] = {}
        self.heap: list[tuple[float, str]] = []
        self.cache: dict[str, tuple[Signature, bytes]] = {}  # path -> (stat, sha256)
        self.floors: dict[str, int | None] = {}  # key -> latest effective time (mtime mode)
        self.unreadable: set[str] = set()
        # key -> the SHA-256 believed archived now (a live document); missing: ABSENT.
        self.archived: dict[str, bytes] = {}
        self.observer: Any = None
        self.watching: list[str] = []
        self._aliases: list[tuple[str, str]] = []  # (resolved, given) watched folders

    # -- called from other threads ------------------------------------------------------------

    def post(self, event: FileSystemEvent) -> None:
        with self.cond:
            self.inbox.append(event)
            self.cond.notify()

    def request_rescan(self) -> None:
        with self.cond:
            self.rescan_wanted = True
            self.cond.notify()

    def request_stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def interrupt(self) -> None:
        """Safe in a signal handler: a plain assignment, no lock."""
        self.interrupted = True

    # -- the observer ---------------------------------------------------------------------

    def start_observer(self) -> Any:
        """Start watching; a native observer that cannot start falls back to polling."""
        if not self.polling:
            from watchdog.observers import Observer

            try:
                return self._start(Observer())
            except OSError as error:
                log.warning(
                    "native file notifications unavailable (%s): polling every %.0f s",
                    error,
                    POLL_INTERVAL,
                )
                self.polling = True
        from watchdog.observers.polling import PollingObserverVFS

        # lstat: the snapshots do not descend into symlinked folders, as inotify does not;
        # with stat a cycle (`loop -> .`) made the first snapshot endless.
        return self._start(
            PollingObserverVFS(stat=os.lstat, listdir=os.scandir, polling_interval=POLL_INTERVAL)
        )

    def _start(self, observer: Any) -> Any:
        handler = _Enqueue(self.post)
        watching = [d for d in self.rules.dirs if os.path.isdir(d)]
        for d in self.rules.dirs:
            if d not in watching:
                log.error("cannot watch %s: no such folder (watched again once it exists)", d)
        # A folder given through a symlink is watched where it is: inotify would watch the
        # symlink itself, and nothing would arrive. (watchdog's follow_symlink would follow
        # every symlinked folder below too, and loops without end on `loop -> .`.) Its
        # events are mapped back to the path given, which the keys are made from.
        self._aliases = [(os.path.realpath(d), d) for d in watching]
        self._aliases = [(real, d) for real, d in self._aliases if real != d]
        try:
            for d in watching:
                observer.schedule(
                    handler, os.path.realpath(d), recursive=True, event_filter=EVENT_FILTER
                )
            observer.start()
        except BaseException:
            try:
                observer.stop()
            except Exception:  # best effort: it may not have started at all
                log.debug("stopping a half-started observer failed", exc_info=True)
            raise
        self.observer = observer
        self.watching = watching
        return observer

    def observer_trouble(self) -> str | None:
        """Why notifications need restarting, or None: the observer thread or one folder's
        emitter died (a handler error, a watched folder deleted), or a missing folder is
        back."""
        observer = self.observer
        if observer is None or not observer.is_alive():
            return "the file observer stopped"
        if not all(emitter.is_alive() for emitter in list(observer.emitters)):
            return "a folder's notifications stopped"
        if self.watching != [d for d in self.rules.dirs if os.path.isdir(d)]:
            return "a watched folder appeared or vanished"
        return None

    # -- the worker thread ------------------------------------------------------------------

    def run(self, *, startup: bool = True) -> None:
        """Reconcile, then turn events into versions until asked to stop."""
        try:
            if startup:
                self.reconcile(startup=True)
            self._loop()
        except BaseException as error:  # a database that never came back, or a bug
            self.failed = f"{type(error).__name__}: {error}"
            log.exception("the watcher stopped on an error")

    def _loop(self) -> None:
        next_rescan = time.monotonic() + self.rescan_every if self.rescan_every else None
        backoff = 1.0
        while True:
            with self.cond:
                while not (self.inbox or self.stopping):
                    wake = [t for t in (self._next_deadline(), next_rescan) if t is not None]
                    if self.rescan_wanted:
                        wake.append(self.last_rescan + RESCAN_GAP)
                    if wake and min(wake) <= time.monotonic():
                        break
                    self.cond.wait(min(wake) - time.monotonic() if wake else None)
                events, self.inbox = self.inbox, []
                stopping = self.stopping
                # During an overflow storm every rescan would be overtaken at once: at most
                # one per RESCAN_GAP, and always one after the last request.
                rescan = self.rescan_wanted and (time.monotonic() >= self.last_rescan + RESCAN_GAP)
                if rescan:
                    self.rescan_wanted = False
            try:
                for event in events:
                    self._on_event(event)
                if stopping:
                    self._finish()
                    return
                if rescan or (next_rescan is not None and time.monotonic() >= next_rescan):
                    self.reconcile(startup=False)
                    if self.rescan_every:
                        next_rescan = time.monotonic() + self.rescan_every
                self._process_due()
                backoff = 1.0
            except StorageError:
                raise  # `_db` already retried; only a stop gives up
            except Exception:
                # A bug must not end the daemon: what this round held is found again by a
                # rescan, after a pause so that a persistent error cannot spin.
                log.exception("unexpected error; rescanning in %.0f s", backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                self.request_rescan()

    def _finish(self) -> None:
        """Record everything pending now. A conflict puts its path back in `pending`: a
        few more rounds record it against the refreshed state; whatever another writer keeps
        changing after that is left to it, or to the next start's reconcile."""
        for _ in range(FINAL_ROUNDS):
            self._process_due(final=True)
            if not self.pending:
                return

    def run_once(self) -> None:
        """`--once`: reconcile, wait for files that are still being written, and return."""
        self.reconcile(startup=True)
        give_up = time.monotonic() + self.max_delay
        while self.pending and not self.interrupted:
            deadline = self._next_deadline()
            now = time.monotonic()
            if deadline is not None and deadline > now:
                time.sleep(min(deadline, give_up) - now if give_up > now else 0)
            self._process_due(final=time.monotonic() >= give_up)

    # -- events -> pending paths and renames ---------------------------------------------------

    def _given(self, path: str) -> str:
        """An event's path under the folder as given (see `_start`)."""
        for real, given in self._aliases:
            if path == real or path.startswith(real + os.sep):
                return given + path[len(real) :]
        return path

    def _on_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        src = self._given(os.fsdecode(event.src_path))
        if kind == EVENT_TYPE_MOVED:
            if event.is_synthetic:
                return  # a file inside a moved folder: the folder's move covers it
            dest = self._given(os.fsdecode(event.dest_path))
            if event.is_directory:
                self._folder_moved(src, dest)
            else:
                self._file_moved(src, dest)
        elif event.is_directory:
            if kind == EVENT_TYPE_CREATED:
                self._touch_tree(src)  # files may predate the watch on the new folder
            elif kind == EVENT_TYPE_DELETED:
                self._touch_under(src)  # a folder moved out of the tree says nothing more
        elif kind in (
            EVENT_TYPE_CREATED,
            EVENT_TYPE_MODIFIED,
            EVENT_TYPE_CLOSED,
            EVENT_TYPE_DELETED,
            EVENT_TYPE_ATTRIB,
        ):
            self._touch(src)

    def _touch(self, path: str, delay: float | None = None, first_seen: float | None = None):
        """Make `path` due after a quiet period; every new event restarts the period, up
        to `max_delay` after the first one."""
        if self.rules.key_of(path) is None:
            return
        now = time.monotonic()
        entry = self.pending.get(path)
        if entry is None:
            entry = Pending(0.0, first_seen if first_seen is not None else now)
            self.pending[path] = entry
            log.debug("pending %s", path)
        deadline = now + (self.debounce if delay is None else delay)
        entry.deadline = min(deadline, max(entry.first_seen + self.max_delay, now))
        heapq.heappush(self.heap, (entry.deadline, path))

    def _touch_tree(self, folder: str) -> None:
        if self.rules.skip_dir(folder):
            return
        for path in self.rules.walk(folder, []):
            self._touch(path)

    def _touch_under(self, folder: str) -> None:
        """Everything we know under a folder that may be gone: its live documents and the
        paths pending or cached there."""
        prefix = self.rules.prefix_of(folder)
        if prefix is not None:
            for key in self._db(lambda: self.arc.live_keys(prefix)):
                self._touch(self.rules.path_of(key))
        for path in [*self.pending, *self.cache]:
            if _inside(path, folder):
                self._touch(path)

    def _file_moved(self, src: str, dest: str) -> None:
        src_key, dest_key = self.rules.key_of(src), self.rules.key_of(dest)
        if dest_key is None:  # moved out, or to an ignored name (vim's `file~` backup)
            if src_key is not None:
                self._touch(src)
            return
        if src_key is not None and src_key in self._db(lambda: self.arc.live_keys(src_key)):
            self._rename(src_key, dest_key, src, dest)
        self._touch(dest)  # atomic saves: the target's new bytes come through a move

    def _rename(self, old: str, new: str, src: str, dest: str) -> bool:
        """Record `old` -> `new` (a live document); a taken target turns into a change of
        the target plus the source's deletion. True if a rename was recorded."""
        if old == new:
            return False
        try:
            result = self._db(lambda: self.arc.rename(old, new, at=self._rename_at([dest])))
        except NotFound:
            return False  # another writer moved or deleted it first
        except BadInput:
            self._touch(src)
            return False
        self._committed([result])
        self._moved(src, dest)
        return True

    def _moved(self, src: str, dest: str) -> None:
        """A recorded rename: what we knew of the source path is now the target's."""
        self.pending.pop(src, None)
        if src in self.cache:
            self.cache[dest] = self.cache.pop(src)

    def _folder_moved(self, src: str, dest: str) -> None:
        old_prefix, new_prefix = self.rules.prefix_of(src), self.rules.prefix_of(dest)
        if old_prefix is not None and old_prefix != "":
            if new_prefix is None:
                self._touch_under(src)
            else:
                # Events from before the move name paths that are gone; first, so that
                # what is touched below (a source to delete) stays pending.
                for path in list(self.pending):
                    if _inside(path, src):
                        self.pending.pop(path)
                pairs = []
                for key in self._db(lambda: self.arc.live_keys(old_prefix)):
                    new_key = new_prefix + key[len(old_prefix) :]
                    if self.rules.key_of(self.rules.path_of(new_key)) != new_key:
                        self._touch(self.rules.path_of(key))
                    else:
                        pairs.append((key, new_key))
                self._rename_many(pairs, old_prefix, new_prefix)
        if new_prefix is not None:
            self._touch_tree(dest)

    def _rename_many(self, pairs: list[tuple[str, str]], old_prefix: str, new_prefix: str) -> None:
        """A moved folder's live documents: those whose new name is free in one
        transaction, the others one by one (`_rename`: a taken name is a change there).
        `rename_many` is all or none: if another writer took a name or moved a source since
        we looked (a second daemon on the same folder), look again once, then go one by one."""
        if not pairs:
            return
        single: list[tuple[str, str]] = []
        for attempt in range(2):
            if attempt:
                live = set(self._db(lambda: self.arc.live_keys(old_prefix)))
                pairs = [(old, new) for old, new in pairs if old in live]
            taken = set(self._db(lambda: self.arc.live_keys(new_prefix)))
            free = [(old, new) for old, new in pairs if new not in taken]
            single = [(old, new) for old, new in pairs if new in taken]
            if not free:
                break
            at = self._rename_at([self.rules.path_of(new) for _, new in free])
            try:
                results = self._db(partial(self.arc.rename_many, free, at=at))
            except (BadInput, NotFound) as error:
                log.debug("renaming %d documents at once failed: %s", len(free), error)
                single = pairs
                continue
            self._committed(results)
            for old, new in free:
                self._moved(self.rules.path_of(old), self.rules.path_of(new))
            break
        for old, new in single:
            self._rename(old, new, self.rules.path_of(old), self.rules.path_of(new))

    # -- due paths -> versions -----------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        while self.heap:
            deadline, path = self.heap[0]
            entry = self.pending.get(path)
            if entry is not None and entry.deadline == deadline:
                return deadline
            heapq.heappop(self.heap)  # superseded by a later touch, or already done
        return None

    def _process_due(self, *, final: bool = False) -> None:
        """Read what is due (everything, when stopping) and record it in few transactions."""
        now = time.monotonic()
        due: list[tuple[str, Pending]] = []
        while True:
            deadline = self._next_deadline()
            if deadline is None or (deadline > now and not final):
                break
            _, path = heapq.heappop(self.heap)
            due.append((path, self.pending.pop(path)))
        if not due:
            return
        batch: list[Version] = []
        size = 0
        gone: list[tuple[str, str]] = []
        for path, entry in due:
            key = self.rules.key_of(path)
            if key is None:
                continue
            force = final or now - entry.first_seen >= self.max_delay
            got = self._read(path, force=force)
            if got.outcome == "gone":
                gone.append((key, path))
            elif got.outcome == "unstable":
                self._touch(path, delay=got.retry_in, first_seen=entry.first_seen)
            elif got.outcome == "data":
                assert got.st is not None
                batch.append(self._version(key, got))
                size += len(got.data)
                if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
                    self._record(batch)
                    batch, size = [], 0
        batch += self._deletions(gone)
        self._record(batch)

    def _deletions(self, gone: list[tuple[str, str]]) -> list[Version]:
        """Deletions for vanished paths that are live documents (temporary files never
        recorded cost one read, not a write transaction)."""
        if not gone:
            return []
        # A string prefix, as `live_keys` compares: one query for the whole batch.
        prefix = os.path.commonprefix([key for key, _ in gone])  # noqa: RUF071
        live = set(self._db(lambda: self.arc.live_keys(prefix)))
        for key, _ in gone:
            if key not in live:
                self.archived.pop(key, None)  # read after the file was found gone: safe
        return [
            Version(key, None, expect=self._expect(key))
            for key, path in gone
            if key in live and absent(path)
        ]

    def _read(self, path: str, *, force: bool) -> Read:
        """The bytes of a regular file, if it has been quiet and did not change while read.
        A vanished file is `gone`; an unreadable one is logged and skipped until it changes
        or the next rescan."""
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return GONE  # a folder or a FIFO now: no longer a document, as for ingest
            if not force:
                age = time.time() - st.st_mtime_ns / 1e9
                if 0 <= age < self.debounce:  # written recently: wait (future mtimes do not)
                    return Read("unstable", retry_in=self.debounce - age)
            # O_NONBLOCK: a file replaced by a FIFO must not hang the daemon in open().
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as handle:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    return GONE
                if self.rules.database_files.same_file(before):  # what was opened, by inode
                    self.rules.refuse(path, f"{path}: a hard link to the archive's own database")
                    return SKIP
                data = handle.read()
                after = os.fstat(fd)
        except (FileNotFoundError, NotADirectoryError):
            return GONE
        except OSError as error:  # permissions, mostly
            if path not in self.unreadable:
                self.unreadable.add(path)
                log.warning("cannot read %s: %s (will retry)", path, error.strerror or error)
            else:
                log.debug("still cannot read %s: %s", path, error.strerror or error)
            return SKIP
        if self.unreadable and path in self.unreadable:
            self.unreadable.discard(path)
            log.info("%s is readable again", path)
        if not force and (
            signature(before)[:2] != signature(after)[:2] or len(data) != after.st_size
        ):
            return Read("unstable", retry_in=self.debounce)
        self.cache[path] = (signature(after), hashlib.sha256(data).digest())
        return Read("data", data, after)

    # -- effective times (mtime mode) -----------------------------------------------------------

    def _at(self, key: str, st: os.stat_result) -> int | None:
        """None (observed: now), or the file's mtime in microseconds. An mtime older than
        the document's last event is raised to it: a back-dated version would not be the
        document's current content, and the archive must end with every file's bytes."""
        if not self.use_mtime:
            return None
        at = st.st_mtime_ns // 1000
        floor = self._floor(key)
        if floor is not None and at < floor:
            log.info("%s: mtime is older than its last event; effective time raised", key)
            at = floor
        return at

    def _rename_at(self, paths: Iterable[str]) -> int | None:
        """None (observed: now), or the earliest mtime of the renamed files: the archive
        raises each rename to its document's last effective time, which keeps them in order
        without moving any later than that."""
        if not self.use_mtime:
            return None
        times = []
        for path in paths:
            try:
                times.append(os.stat(path).st_mtime_ns // 1000)
            except OSError:
                continue
        return min(times) if times else None

    def _floor(self, key: str) -> int | None:
        if key not in self.floors:
            try:
                found = self._db(lambda: self.arc.history(key))
            except NotFound:
                found = []
            # A history found through an old name belongs to a renamed document; the key
            # would start a new one.
            alive = bool(found) and found[-1].key == key
            self.floors[key] = max(e.effective_at for e in found) if alive else None
        return self.floors[key]

    # -- recording ------------------------------------------------------------------------------

    def _version(self, key: str, got: Read) -> Version:
        """A version from a read, guarded by what we believe the archive holds for `key`."""
        assert got.st is not None
        return Version(key, got.data, self._at(key, got.st), expect=self._expect(key))

    def _expect(self, key: str) -> bytes:
        return self.archived.get(key, ABSENT)

    def _refresh(self, key: str) -> None:
        """Read again what the archive holds for `key` (after a conflict, before the file
        is read again): the version in effect now, and the floor in mtime mode."""
        try:
            found = self._db(lambda: self.arc.history(key))
        except NotFound:
            found = []
        # A history found through an old name belongs to a renamed document: the key is free.
        alive = bool(found) and found[-1].key == key
        head = max(found, key=lambda e: (e.effective_at, e.seq)) if alive else None
        if head is None or head.type == DELETED or head.sha256 is None:
            self.archived.pop(key, None)
        else:
            self.archived[key] = head.sha256
        if self.use_mtime:
            self.floors[key] = max(e.effective_at for e in found) if alive else None

    def _record(self, versions: list[Version]) -> None:
        if not versions:
            return
        try:
            results = self._db(lambda: self.arc.record_many(versions))
        except BadInput as error:
            if len(versions) == 1:
                log.error("cannot record %s: %s", versions[0].key, error)
                return
            for version in versions:  # isolate the one the archive refuses
                self._record([version])
            return
        self._committed(results)

    def _committed(self, results: Iterable[Recorded]) -> None:
        """Log what a committed transaction recorded, one line per version, and keep what
        we believe is archived up to date. A conflict (another writer recorded that key
        since we last knew it) refreshes the key and reads its file again after the
        debounce period. "unchanged" and "absent" passed their `expect`: nothing to learn."""
        for r in results:
            ev = r.event
            if ev is None:
                if r.status == "conflict":
                    log.debug("conflict %s: another writer recorded it; reading it again", r.key)
                    self._refresh(r.key)
                    self._touch(self.rules.path_of(r.key))
                elif r.status != "absent":
                    log.debug("%s %s", r.status, r.key)
                continue
            if ev.type == DELETED or ev.sha256 is None:
                self.archived.pop(r.key, None)
            else:
                self.archived[r.key] = ev.sha256
            if self.use_mtime:
                floor = self.floors.get(r.key)
                self.floors[r.key] = (
                    ev.effective_at if floor is None else max(floor, ev.effective_at)
                )
            sha = f" sha256 {ev.sha256.hex()[:12]}…" if ev.sha256 else ""
            if r.status == "renamed":
                old = (ev.meta or {}).get("from")
                if old:
                    self.archived.pop(old, None)
                if self.use_mtime and old:
                    self.floors[old] = None  # a file there now starts a new document
                log.info("recorded renamed %s -> %s v%d%s", old, r.key, ev.seq, sha)
            else:
                log.info("recorded %s %s v%d%s", r.status, r.key, ev.seq, sha)

    def _db(self, call: Callable[[], T]) -> T:
        """Call the archive, waiting out a database that is down or locked: events keep
        accumulating in memory meanwhile. When stopping, give up after a few tries."""
        backoff, tries = 0.5, 0
        while True:
            try:
                return call()
            except StorageError as error:
                tries += 1
                if (self.stopping or not self.patient) and tries >= 3:
                    raise
                log.error("database unavailable (%s); retrying in %.1f s", error, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    # -- reconciling with the folders ----------------------------------------------------------

    def reconcile(self, *, startup: bool) -> None:
        """Bring the archive in line with the folders: record every file whose bytes differ
        from the archive's current version, and every live document whose file is gone.
        At start-up every file is hashed; later rescans hash only files whose stat moved."""
        began = time.monotonic()
        kind = "start-up scan" if startup else "rescan"
        # The archive's view first: a file created after this read cannot look deleted.
        _, current = self._db(self.arc.corpus)
        prefixes = [p for p in (self.rules.prefix_of(d) for d in self.rules.dirs) if p is not None]
        archived: dict[str, bytes | None] = {}
        by_sha: dict[bytes, list[str]] = {}
        for ev in current:
            if any(ev.key.startswith(p) for p in prefixes):
                archived[ev.key] = ev.sha256
                if ev.sha256 is not None and ev.size > 0:
                    by_sha.setdefault(ev.sha256, []).append(ev.key)
            if self.use_mtime:
                self.floors[ev.key] = ev.effective_at
        # Read before any file is: what we believe from now on, updated as we commit.
        self.archived = {key: sha for key, sha in archived.items() if sha is not None}
        present: set[str] = set()
        seen: set[str] = set()
        blocked: list[str] = []
        batch: list[Version] = []
        size = files = recorded = 0
        complete = True
        for folder in self.rules.dirs:
            if not os.path.isdir(folder):
                log.error("watched folder %s is missing: nothing under it is deleted", folder)
                blocked.append(folder)
                continue
            for path in self.rules.walk(folder, blocked):
                if self.interrupted:
                    complete = False
                    break
                key = self.rules.key_of(path)
                if key is None:
                    continue
                present.add(key)
                seen.add(path)
                files += 1
                if path in self.pending:
                    continue  # a debounced event will read it
                got = self._compare(path, key, archived.get(key))
                if got is None:
                    continue
                if got.outcome == "gone":
                    present.discard(key)
                elif got.outcome == "unstable":
                    self._touch(path, delay=got.retry_in)
                elif got.outcome == "data":
                    assert got.st is not None
                    sha = self.cache[path][1]
                    if key not in archived:
                        old = self._moved_while_unseen(key, sha, by_sha, blocked)
                        if old and self._rename(old, key, self.rules.path_of(old), path):
                            del archived[old]
                            archived[key] = sha
                            by_sha[sha].remove(old)
                            recorded += 1
                            continue
                    batch.append(self._version(key, got))
                    size += len(got.data)
                    if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
                        self._record(batch)
                        recorded += len(batch)
                        batch, size = [], 0
        if complete:
            batch += [
                Version(key, None, expect=self._expect(key))
                for key in archived
                if key not in present and self._may_delete(key, blocked)
            ]
        recorded += len(batch)
        self._record(batch)
        if complete:
            for path in [p for p in self.cache if p not in seen]:
                del self.cache[path]
        log.info(
            "%s: %d files checked, %d changes sent in %.2f s%s",
            kind,
            files,
            recorded,
            time.monotonic() - began,
            "" if complete else " (interrupted: deletions not checked)",
        )
        self.last_rescan = time.monotonic()

    def _compare(self, path: str, key: str, archived: bytes | None) -> Read | None:
        """A read of `path` if its bytes may differ from the archived SHA-256, else None.
        The stat cache spares re-hashing files that did not move since the last scan."""
        cached = self.cache.get(path)
        if cached is not None and archived is not None and cached[1] == archived:
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                return GONE
            except OSError:
                return None
            if signature(st) == cached[0]:
                return None
        got = self._read(path, force=False)
        if got.outcome == "data" and self.cache[path][1] == archived:
            return None
        return got

    def _may_delete(self, key: str, blocked: list[str]) -> bool:
        """Record a deletion only for a path we watch, that we could list, that no event is
        about to settle, and that is really absent now."""
        path = self.rules.path_of(key)
        if not self.rules.owns(key) or path in self.pending:
            return False
        if any(path == b or _inside(path, b) for b in blocked):
            return False
        return absent(path)

    def _moved_while_unseen(
        self, key: str, sha: bytes, by_sha: dict[bytes, list[str]], blocked: list[str]
    ) -> str | None:
        """The live document a new file was moved from while nobody watched (the daemon
        down, or notifications lost): the one archived key with the same bytes whose file
        is gone. Ambiguous matches are left to delete + create."""
        candidates = [k for k in by_sha.get(sha, ()) if k != key and self._may_delete(k, blocked)]
        return candidates[0] if len(candidates) == 1 else None


# -- the process: logging, signals, supervision ---------------------------------------------------


class _Signals:
    """SIGTERM and SIGINT wake the main thread through a self-pipe: the Python-level
    handler only records the signal, so it can never deadlock on a lock the interrupted
    code holds."""

    def __init__(self, on_signal: Callable[[], None]):
        self.received: list[int] = []
        self._on_signal = on_signal
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._saved: dict[int, Any] = {}
        self._saved_fd: int | None = None
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _Signals:
        if self.active:
            self._saved_fd = signal.set_wakeup_fd(self._write)
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        self._on_signal()

    def wait(self, timeout: float) -> bool:
        """True once a stop signal arrived; otherwise returns after `timeout`."""
        if not self.received:
            ready, _, _ = select.select([self._read], [], [], timeout)
            if ready:
                try:
                    while os.read(self._read, 512):
                        pass
                except BlockingIOError:
                    pass
        return bool(self.received)

    def __exit__(self, *_exc: object) -> None:
        if self.active:
            for signum, handler in self._saved.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(self._saved_fd if self._saved_fd is not None else -1)
        os.close(self._read)
        os.close(self._write)


def _setup_logging(level: str) -> Callable[[], None]:
    """Log lines on standard error: ours at `level`, watchdog's warnings. Under systemd
    (JOURNAL_STREAM set) the journal adds the time itself. Returns the undo."""
    handler = logging.StreamHandler(sys.stderr)
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler.setFormatter(logging.Formatter(stamp + "%(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("archive")
    theirs = logging.getLogger("watchdog")
    saved = (ours.level, ours.propagate, theirs.level)
    ours.setLevel(getattr(logging, level.upper()))
    ours.propagate = False
    ours.addHandler(handler)
    theirs_handler = logging.StreamHandler(sys.stderr)
    theirs_handler.setFormatter(handler.formatter)
    theirs_handler.setLevel(logging.WARNING)
    theirs.addHandler(theirs_handler)
    if theirs.getEffectiveLevel() > logging.WARNING:
        theirs.setLevel(logging.WARNING)

    def undo() -> None:
        ours.removeHandler(handler)
        theirs.removeHandler(theirs_handler)
        ours.setLevel(saved[0])
        ours.propagate = saved[1]
        theirs.setLevel(saved[2])

    return undo


def watch(
    arc: Archive,
    dirs: Sequence[str],
    *,
    root: str | None = None,
    debounce: float = 0.5,
    ignore: Sequence[str] = (),
    rescan: float = 300.0,
    effective_time: str = "observed",
    once: bool = False,
    polling: bool = False,
    log_level: str = "info",
) -> None:
    """Record every version of every file under `dirs` until SIGTERM or SIGINT (then
    record what is pending and return), or, with `once`, reconcile and return."""
    if effective_time not in ("observed", "mtime"):
        raise BadInput("effective time must be 'observed' or 'mtime'")
    limits = (("debounce", debounce, MAX_DEBOUNCE), ("rescan", rescan, MAX_RESCAN))
    for name, seconds, most in limits:
        if not 0 <= seconds <= most:  # also refuses NaN
            raise BadInput(f"{name} must be from 0 to {most:g} seconds, not {seconds}")
    rules = Rules.build(arc, dirs, root, ignore)  # the folders first: a typo creates nothing
    undo_logging = _setup_logging(log_level)
    try:
        arc.init()  # fail now on a wrong or unreachable database, not in the worker
        _refuse_foreign_folders(arc, rules)
        watcher = Watcher(
            arc,
            rules,
            debounce=debounce,
            rescan=rescan,
            use_mtime=effective_time == "mtime",
            polling=polling,
        )
        if once:
            watcher.patient = False
            with _Signals(watcher.interrupt):
                watcher.run_once()
            return
        _run_daemon(watcher)
    finally:
        undo_logging()


MAX_DEBOUNCE = 3600.0
MAX_RESCAN = 7 * 86400.0


def _refuse_foreign_folders(arc: Archive, rules: Rules) -> None:
    """Start-up guard, folder by folder: when the archive holds documents that reconciling
    this folder could delete (under its keys, not ignored) and not one of them is there, the
    folder is most likely the wrong one (or --root differs from last time), and reconciling
    would record every one of them as deleted, for good."""
    _, current = arc.corpus()
    live = [ev.key for ev in current if ev.sha256 is not None]
    for folder in rules.dirs:
        prefix = rules.prefix_of(folder)
        if prefix is None:
            continue
        deletable = {
            k for k in live if k.startswith(prefix) and rules.owns(k)
        }
        # Present as reconciling sees it (a regular file, through symlinks too; a file we
        # may not even stat is not proof of absence): one is enough to go on.
        if not deletable or not all(absent(rules.path_of(k)) for k in deletable):
            continue
        raise BadInput(
            f"none of the {len(deletable)} documents the archive holds under the keys of "
            f"{folder} is there: watching would record them all as deleted. Check the "
            "folder and --root; if they are gone indeed, record that first with `archive "
            f"ingest --deletions --root {rules.root} {folder}`"
        )


def _run_daemon(watcher: Watcher) -> None:
    """Observer first (so nothing is missed), then the worker reconciles and follows."""
    alarm = _OverflowAlarm(watcher.request_rescan)
    for name in OVERFLOW_LOGGERS:
        logging.getLogger(name).addHandler(alarm)
    observer = None
    try:
        with _Signals(watcher.interrupt) as signals:
            observer = watcher.start_observer()
            log.info(
                "watching %s (keys relative to %s; %s; debounce %.2f s; rescan %s)",
                ", ".join(watcher.rules.dirs),
                watcher.rules.root,
                "polling" if watcher.polling else "native notifications",
                watcher.debounce,
                f"every {watcher.rescan_every:g} s" if watcher.rescan_every else "never",
            )
            worker = threading.Thread(target=watcher.run, name="archive-watch", daemon=True)
            worker.start()
            retry_at, backoff = 0.0, 1.0
            while not signals.wait(SUPERVISE_EVERY):
                trouble = watcher.observer_trouble()
                if trouble and time.monotonic() >= retry_at:
                    log.error("%s: restarting notifications and rescanning", trouble)
                    try:
                        observer = _restart(watcher, observer)
                        backoff = 1.0
                    except OSError as error:
                        log.error("cannot watch (%s); trying again in %.0f s", error, backoff)
                        retry_at = time.monotonic() + backoff
                        backoff = min(backoff * 2, MAX_BACKOFF)
                    watcher.request_rescan()
                if not worker.is_alive():
                    if watcher.failed is None:
                        break  # not expected: the worker only returns when stopping
                    log.error("restarting the worker after: %s", watcher.failed)
                    watcher.failed = None
                    worker = threading.Thread(
                        target=watcher.run,
                        kwargs={"startup": False},
                        name="archive-watch",
                        daemon=True,
                    )
                    watcher.request_rescan()
                    worker.start()
            names = ", ".join(signal.Signals(s).name for s in signals.received) or "stop"
            log.info("%s: stopping the observer, recording pending changes", names)
            observer.stop()
            observer.join(timeout=10)
            watcher.request_stop()
            worker.join()
    finally:
        for name in OVERFLOW_LOGGERS:
            logging.getLogger(name).removeHandler(alarm)
    if watcher.failed is not None:
        raise StorageError(
            f"pending changes were not all recorded ({watcher.failed}); "
            "the next start reconciles them"
        )
    log.info("stopped")


def _restart(watcher: Watcher, dead: Any) -> Any:
    try:
        dead.stop()
    except Exception:
        log.debug("stopping the dead observer failed", exc_info=True)
    return watcher.start_observer()
