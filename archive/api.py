"""The library front: `Archive`, the object every caller (CLI, watcher, git import) uses.

    from archive import Archive
    with Archive("archive.db") as arc:
        arc.record("news/a.txt", b"first version")
        arc.show("news/a.txt", at="2020-01-03T08:00Z").data

Times may be given as stored microseconds (int), `datetime`, or text in any form
`archive.timeparse` accepts.
"""

from __future__ import annotations

import itertools
import json
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select, text

from . import content, delta, timeparse
from .errors import BadInput, NotFound
from .events import (
    CREATED,
    DELETED,
    GENESIS,
    MODIFIED,
    RENAMED,
    TYPE_CODES,
    TYPES,
    Event,
    hash_event,
)
from .replay import ContentCache, load, load_one, preload
from .store import Cursor, Store, contents, doc_names, documents, events

TimeLike = int | str | datetime

DEFAULT_KEYFRAME_INTERVAL = 50  # at most this many deltas per replay (git's default pack depth)


def to_us(value: TimeLike | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, datetime):
        return timeparse.to_us(value)
    return timeparse.parse(value)


def check_key(key: str) -> str:
    """A document key: a relative POSIX path that cannot escape an export folder."""
    if not isinstance(key, str) or not key or "\x00" in key:
        raise BadInput(f"invalid document key {key!r}")
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BadInput(f"invalid document key {key!r}: keys are relative paths without '..'")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"document key {key!r} is not valid UTF-8") from None
    return key


@dataclass(frozen=True, slots=True)
class Version:
    """One observation to record: new bytes for a key, or its deletion (`data=None`)."""

    key: str
    data: bytes | None
    at: TimeLike | None = None
    meta: dict[str, Any] | None = None
    # Optimistic check: record only if the version in effect at `at` has this SHA-256
    # (ABSENT: no version); otherwise nothing is recorded and the status is "conflict".
    expect: bytes | None = None
    # Record an event even when the bytes equal the version in effect at `at` (which is
    # otherwise "unchanged", no event): an imported git commit that set them is a version.
    always: bool = False


ABSENT = b""  # `Version.expect` for "the document does not exist at that time"


@dataclass(frozen=True, slots=True)
class Recorded:
    """What recording one observation did: created, modified, deleted, renamed, unchanged."""

    key: str
    status: str
    event: Event | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A version as read back: the event that made it and its exact bytes."""

    event: Event
    data: bytes


@dataclass(slots=True)
class _DocState:
    """A document as the current write transaction sees it (row plus pending changes)."""

    id: int
    key: str | None
    seq: int
    head_hash: bytes
    eff_at: int
    content_id: int | None
    is_new: bool = False
    dirty: bool = False


@dataclass(frozen=True, slots=True)
class _ContentState:
    id: int
    sha256: bytes
    size: int
    depth: int
    base_id: int | None


class _LastWrite:
    """The document states this process's last write left, with their current contents: exact
    while no one else has written since, which the next position tells (every change to
    documents and contents comes with an event, and positions are gapless). A batch then
    reads only the documents it does not know: on 1,000 documents x 100 versions, looking up
    each batch's 1,000 documents and their contents again cost 8 us of a version's 150.
    At most LAST_WRITE_DOCS documents are kept, the least recently written dropped first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mark: tuple[int, int, int] | None = None  # (next position, doc id, content id)
        self.docs: dict[str, tuple[_DocState, _ContentState | None]] = {}

    def valid_at(self, mark: tuple[int, int, int]) -> dict | None:
        with self.lock:
            return self.docs if self.mark == mark else None

    def publish(self, start: tuple[int, int, int], end: tuple[int, int, int], changed) -> None:
        """After a commit that began at `start` and ended at `end`: `changed` are the final
        states of the documents it read or wrote (None: not kept). Merged only into what was
        exact at its start; otherwise (another thread's or process's write in between) they
        alone are."""
        with self.lock:
            if self.mark != start:
                self.docs = {}
            docs = self.docs
            for key, state in changed:
                docs.pop(key, None)
                if state is not None:  # None: a document whose state is not kept
                    docs[key] = state
            for key in list(itertools.islice(docs, max(0, len(docs) - LAST_WRITE_DOCS))):
                del docs[key]
            self.mark = end

    def forget(self) -> None:
        with self.lock:
            self.mark, self.docs = None, {}


LAST_WRITE_DOCS = 20_000


_EVENT_COLUMNS = """
    e.position, e.doc_id, e.seq, e.type, e.key, e.content_id, e.size, e.recorded_at,
    e.effective_at, e.meta, e.event_hash, c.sha256
"""


def _event(row: Any) -> Event:
    """An Event from a row of _EVENT_COLUMNS (a SQLAlchemy row or a DB-API tuple)."""
    meta, sha = row[9], row[11]
    return Event(
        position=row[0],
        doc_id=row[1],
        seq=row[2],
        type=TYPES[row[3]],
        key=row[4],
        sha256=bytes(sha) if sha is not None else None,
        size=row[6],
        recorded_at=row[7],
        effective_at=row[8],
        event_hash=bytes(row[10]),
        meta=json.loads(meta) if meta else None,
        content_id=row[5],
    )


# The document a key names: its current holder, else the latest document that had the name.
_DOC_OF_KEY = (
    "(SELECT coalesce((SELECT id FROM documents WHERE key = :key),"
    " (SELECT max(doc_id) FROM doc_names WHERE key = :key)))"
)
_SELECT_EVENTS = (
    f"SELECT {_EVENT_COLUMNS} FROM events e LEFT JOIN contents c ON c.id = e.content_id "
)
# Hot-path reads, one statement each (driver level: see Store.snapshot).
_HOT_AT = {
    known: _SELECT_EVENTS
    + f"WHERE e.doc_id = {_DOC_OF_KEY} AND e.effective_at <= :at"
    + (" AND e.recorded_at <= :known" if known else "")
    + " ORDER BY e.effective_at DESC, e.seq DESC LIMIT 1"
    for known in (False, True)
}
_HOT_VERSION = {
    known: _SELECT_EVENTS
    + f"WHERE e.doc_id = {_DOC_OF_KEY} AND e.seq = :seq"
    + (" AND e.recorded_at <= :known" if known else "")
    for known in (False, True)
}
_HOT_TIMELINE = {
    known: _SELECT_EVENTS
    + "WHERE e.doc_id = :doc"
    + (" AND e.recorded_at <= :known" if known else "")
    + " ORDER BY e.effective_at, e.seq"
    for known in (False, True)
}
_HOT_DOC = f"SELECT {_DOC_OF_KEY}"
_LATEST = timeparse.LATEST


class Archive:
    """An archive opened on a SQLAlchemy URL or a SQLite file path (default `archive.db`,
    or `ARCHIVE_DB`). Creates or upgrades the schema on first use."""

    def __init__(
        self,
        url: str | None = None,
        *,
        keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL,
        cache_bytes: int = 64 << 20,
    ):
        if keyframe_interval < 1:
            raise BadInput("keyframe interval must be at least 1")
        self.store = Store(url)
        self.keyframe_interval = keyframe_interval
        self.cache = ContentCache(cache_bytes)
        self.last_write = _LastWrite()

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def shown_url(self) -> str:
        """The URL with any password masked, for messages."""
        return self.store.shown_url

    def close(self) -> None:
        self.last_write.forget()  # a database put back under the same URL starts unknown
        self.store.dispose()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def init(self) -> str:
        """Create or upgrade the schema; returns the schema revision."""
        self.store.ensure_schema()
        return self.store.revision() or ""

    def exists(self) -> bool:
        """Whether there is an archive at this URL already (nothing is created to find out)."""
        return self.store.exists()

    def database_files(self) -> list[Path]:
        from .store import sqlite_files

        return sqlite_files(self.url)

    # -- writing -----------------------------------------------------------------------------

    def record(
        self,
        key: str,
        data: bytes,
        *,
        at: TimeLike | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Recorded:
        """Record `data` as the content of `key` effective at `at` (default: now)."""
        return self.record_many([Version(key, data, at, meta)])[0]

    def delete(self, key: str, *, at: TimeLike | None = None) -> Recorded:
        """Record that `key` stopped existing at `at` (default: now)."""
        return self.record_many([Version(key, None, at)])[0]

    def record_many(self, versions: Iterable[Version]) -> list[Recorded]:
        """Record many observations in one transaction, in order; one event per change."""
        batch = [
            Version(check_key(v.key), v.data, to_us(v.at), v.meta, v.expect, v.always)
            for v in versions
        ]
        if not batch:
            return []
        for v in batch:
            if v.data is not None and not isinstance(v.data, bytes | bytearray | memoryview):
                raise BadInput(f"{v.key}: content must be bytes")
        writer = _BatchWriter(self, batch)
        results = self.store.run_write(writer.run)
        writer.publish()
        return results

    def rename(self, old: str, new: str, *, at: TimeLike | None = None) -> Recorded:
        """Record that the document at `old` is now at `new` (same content, same history)."""
        return self.rename_many([(old, new)], at=at)[0]

    def rename_many(
        self, pairs: Iterable[tuple[str, str]], *, at: TimeLike | None = None
    ) -> list[Recorded]:
        """Several renames in one transaction (a folder moved): all or none."""
        checked = [(check_key(old), check_key(new)) for old, new in pairs]
        effective = to_us(at)

        def unit(conn: Connection) -> list[Recorded]:
            # One clock reading for the whole move: every rename of it shares recorded_at, so
            # no "known at" query can see the folder half moved.
            now, recorded_at, position, _, _ = _clock(self.store.cursor(conn))
            results = []
            for old, new in checked:
                result = _rename(conn, old, new, effective, now, recorded_at, position)
                position += result.event is not None
                results.append(result)
            return results

        return self.store.run_write(unit)

    def ingest(
        self,
        paths: Iterable[str | Path],
        *,
        root: str | Path | None = None,
        at: TimeLike | None = None,
        deletions: bool = False,
    ) -> list[Recorded]:
        """Record files (folders recursively) under keys relative to `root`."""
        from .files import ingest

        return ingest(self, paths, root=root, at=at, deletions=deletions)

    # -- reading -----------------------------------------------------------------------------

    def live_keys(self, prefix: str = "") -> list[str]:
        """Current keys of documents that exist now, optionally under a key prefix."""
        with self.store.read() as conn:
            rows = conn.execute(
                text(
                    "SELECT key FROM documents WHERE content_id IS NOT NULL AND key IS NOT NULL"
                    " AND substr(key, 1, :n) = :prefix ORDER BY key"
                ),
                {"n": len(prefix), "prefix": prefix},
            )
            return [r.key for r in rows]

    def _resolve(self, conn: Connection, key: str) -> int:
        doc_id = conn.execute(select(documents.c.id).where(documents.c.key == key)).scalar()
        if doc_id is None:
            doc_id = conn.execute(
                select(func.max(doc_names.c.doc_id)).where(doc_names.c.key == key)
            ).scalar()
        if doc_id is None:
            raise NotFound(f"no document {key!r} in the archive")
        return doc_id

    def _events(self, conn: Connection, where: str, params: dict, tail: str = "") -> list[Event]:
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events e LEFT JOIN contents c ON c.id = e.content_id "
            f"WHERE {where} {tail}"
        )
        return [_event(row) for row in conn.execute(text(sql), params)]

    def history(self, key: str, *, known_at: TimeLike | None = None) -> list[Event]:
        """Every event of the document (followed across renames), oldest first."""
        with self.store.read() as conn:
            doc_id = self._resolve(conn, key)
            where, params = "e.doc_id = :doc", {"doc": doc_id}
            known = to_us(known_at)
            if known is not None:
                where += " AND e.recorded_at <= :known"
                params["known"] = known
            return self._events(conn, where, params, "ORDER BY e.seq")

    def event_at(
        self,
        conn: Connection,
        doc_id: int,
        *,
        at: int | None = None,
        version: int | None = None,
        known_at: int | None = None,
    ) -> Event | None:
        """The event in effect: by number, or the greatest effective_at ≤ at (ties: seq)."""
        where, params = "e.doc_id = :doc", {"doc": doc_id}
        if known_at is not None:
            where += " AND e.recorded_at <= :known"
            params["known"] = known_at
        if version is not None:
            where += " AND e.seq = :seq"
            params["seq"] = version
            tail = ""
        else:
            if at is not None:
                where += " AND e.effective_at <= :at"
                params["at"] = at
            tail = "ORDER BY e.effective_at DESC, e.seq DESC LIMIT 1"
        found = self._events(conn, where, params, tail)
        return found[0] if found else None

    def show(
        self,
        key: str,
        *,
        at: TimeLike | None = None,
        version: int | None = None,
        known_at: TimeLike | None = None,
    ) -> Snapshot:
        """The exact bytes of a document at a time, or of version N; NotFound if absent."""
        if at is not None and version is not None:
            raise BadInput("give either a time or a version number, not both")
        at_us, known = to_us(at), to_us(known_at)
        with self.store.snapshot() as cur:
            params: dict[str, Any] = {"key": key}
            if known is not None:
                params["known"] = known
            if version is not None:
                params["seq"] = version
                row = cur.execute(_HOT_VERSION[known is not None], params).fetchone()
            else:
                params["at"] = at_us if at_us is not None else _LATEST
                row = cur.execute(_HOT_AT[known is not None], params).fetchone()
            if row is None:
                if cur.execute(_HOT_DOC, {"key": key}).fetchone()[0] is None:
                    raise NotFound(f"no document {key!r} in the archive")
                if version is not None:
                    raise NotFound(f"{key!r} has no version {version}")
                when = f" at {timeparse.show(at_us)}" if at_us is not None else ""
                raise NotFound(f"{key!r} did not exist{when}")
            found = _event(row)
            if found.type == DELETED:
                if version is not None:
                    raise NotFound(f"version {version} of {key!r} is its deletion")
                raise NotFound(
                    f"{key!r} was deleted at {timeparse.show(found.effective_at)}"
                )
            assert found.content_id is not None
            return Snapshot(found, load_one(cur, found.content_id, self.cache))

    @contextmanager
    def reader(self, *, known_at: TimeLike | None = None) -> Iterator[Reader]:
        """Many point-in-time reads in one snapshot (what `show --batch` uses)."""
        with self.store.snapshot() as cur:
            yield Reader(self, cur, to_us(known_at))

    def _content(self, conn: Connection, found: Sequence[Event]) -> dict[int, bytes]:
        """Verified bytes per event position, for events that carry content."""
        ids = {ev.position: ev.content_id for ev in found if ev.content_id is not None}
        rebuilt = load(self.store.cursor(conn), ids.values(), self.cache)
        return {pos: rebuilt[cid] for pos, cid in ids.items()}

    def versions(self, key: str, *, known_at: TimeLike | None = None) -> list[Snapshot]:
        """Every version of a document with its bytes (deletions carry b"")."""
        with self.store.read() as conn:
            doc_id = self._resolve(conn, key)
            where, params = "e.doc_id = :doc", {"doc": doc_id}
            known = to_us(known_at)
            if known is not None:
                where += " AND e.recorded_at <= :known"
                params["known"] = known
            found = self._events(conn, where, params, "ORDER BY e.seq")
            rebuilt = self._content(conn, found)
            return [
                Snapshot(ev, rebuilt.get(ev.position, b""))
                for ev in found
            ]

    def changes(self, key: str, *, known_at: TimeLike | None = None) -> list[dict[str, Any]]:
        """History with, per event, what changed (characters added and removed, appended or
        edited in place) and the version it reverts to, if any."""
        from .changes import describe

        return describe(self.versions(key, known_at=known_at))

    def diff(
        self,
        key: str,
        old: str | int | None = None,
        new: str | int | None = None,
        *,
        fmt: str = "words",
    ) -> dict[str, Any]:
        """The change between two versions (numbers or times; default: the last two)."""
        from . import changes

        first = self.resolve_version(key, old, default=-2)
        second = self.resolve_version(key, new, default=-1)
        a = self.show(key, version=first) if first else None
        b = self.show(key, version=second)
        text_a = content.as_text(a.data) if a else ""
        text_b = content.as_text(b.data)
        if text_a is None or text_b is None:
            raise BadInput(f"{key!r} is binary at one of these versions; use show")
        result: dict[str, Any] = {"key": key, "from": a.event, "to": b.event}
        if fmt == "unified":
            result["text"] = changes.render_unified(
                text_a, text_b, f"{key}@v{first}", f"{key}@v{second}"
            )
        elif fmt == "json":
            result["diffs"] = [
                {"op": {0: "=", -1: "-", 1: "+"}[op], "text": t}
                for op, t in changes.word_diff(text_a, text_b)
            ]
            result["summary"] = changes.summarize(a.data, b.data)
        else:
            result["diffs"] = changes.word_diff(text_a, text_b)
        return result

    def corpus(
        self, *, at: TimeLike | None = None, known_at: TimeLike | None = None
    ) -> tuple[int, list[Event]]:
        """The high-water position and, per document that existed at `at`, the event in
        effect (its `content_id` names the bytes), ordered by key."""
        at_us, known = to_us(at), to_us(known_at)
        conds, params = ["x.doc_id = d.id"], {}
        if at_us is not None:
            conds.append("x.effective_at <= :at")
            params["at"] = at_us
        if known is not None:
            conds.append("x.recorded_at <= :known")
            params["known"] = known
        where = " AND ".join(conds)
        # Per document, one index seek for the event in effect: cost grows with documents,
        # not with the length of their histories.
        sql = f"""
            SELECT {_EVENT_COLUMNS} FROM documents d
            JOIN events e ON e.position = (
                SELECT x.position FROM events x WHERE {where}
                ORDER BY x.effective_at DESC, x.seq DESC LIMIT 1)
            LEFT JOIN contents c ON c.id = e.content_id
            WHERE e.type != :deleted ORDER BY e.key
        """
        params["deleted"] = TYPE_CODES[DELETED]
        high = "SELECT max(position) FROM events"
        if known is not None:
            high += " WHERE recorded_at <= :known"
        with self.store.snapshot() as cur:  # driver level: thousands of rows
            rows = [_event(r) for r in cur.execute(sql, params).fetchall()]
            position = cur.execute(high, {"known": known} if known is not None else {})
            return position.fetchone()[0] or 0, rows

    def read_contents(self, content_ids: Sequence[int]) -> dict[int, bytes]:
        """Verified bytes for content ids (as returned by `corpus`), read in bulk: what is
        cached is used, nothing is added to the cache (an export reads each content once)."""
        with self.store.snapshot() as cur:
            return load(cur, content_ids, self.cache, keep=False)

    def log(
        self,
        *,
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        known_at: TimeLike | None = None,
        by: str = "effective",
    ) -> list[Event]:
        """The global event stream in position order, filtered by effective (or recorded)
        time: `since` ≤ t ≤ `until`."""
        column = {"effective": "e.effective_at", "recorded": "e.recorded_at"}[by]
        conds, params = ["1=1"], {}
        for name, value, op in (("since", since, ">="), ("until", until, "<=")):
            if value is not None:
                conds.append(f"{column} {op} :{name}")
                params[name] = to_us(value)
        if known_at is not None:
            conds.append("e.recorded_at <= :known")
            params["known"] = to_us(known_at)
        with self.store.read() as conn:
            return self._events(conn, " AND ".join(conds), params, "ORDER BY e.position")

    def resolve_version(self, key: str, ref: str | int | None, *, default: int) -> int:
        """A diff endpoint as a version number: a number, a time, or `default` (negative
        counts from the end)."""
        with self.store.read() as conn:
            doc_id = self._resolve(conn, key)
            last = conn.execute(select(documents.c.seq).where(documents.c.id == doc_id)).scalar()
            if ref is None:
                number = last + 1 + default if default < 0 else default
                if number < 1:
                    raise NotFound(f"{key!r} has only {last} version(s)")
                return number
            if isinstance(ref, str) and ref.lower().startswith("v") and ref[1:].isdigit():
                ref = ref[1:]
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                number = int(ref)
                if not 1 <= number <= last:
                    raise NotFound(f"{key!r} has no version {number} (it has {last})")
                return number
            found = self.event_at(conn, doc_id, at=to_us(ref))
            if found is None:
                raise NotFound(f"{key!r} did not exist at {ref}")
            return found.seq

    # -- reports --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts and sizes: raw bytes of all versions against what is stored."""
        with self.store.read() as conn:
            row = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM documents) AS documents,"
                    " (SELECT count(*) FROM events) AS events,"
                    " (SELECT count(*) FROM contents) AS contents,"
                    " (SELECT count(*) FROM contents WHERE base_id IS NULL) AS keyframes,"
                    " (SELECT coalesce(sum(size), 0) FROM events WHERE type != :deleted)"
                    "   AS raw_bytes,"
                    " (SELECT coalesce(sum(size), 0) FROM contents) AS distinct_bytes,"
                    " (SELECT coalesce(sum(length(data)), 0) FROM contents) AS stored_bytes"
                ),
                {"deleted": TYPE_CODES[DELETED]},
            ).one()
            # int(): PostgreSQL's sum() over BIGINT is NUMERIC.
            result = {name: int(value) for name, value in row._mapping.items()}
            result["database_bytes"] = int(self.store.database_size(conn))
        raw = result["raw_bytes"] or 0
        result["ratio"] = round(result["stored_bytes"] / raw, 4) if raw else None
        result["database_ratio"] = round(result["database_bytes"] / raw, 4) if raw else None
        result["keyframe_interval"] = self.keyframe_interval
        return result

    def verify(self) -> list[dict[str, Any]]:
        """Replay every content, recompute every hash and chain; the list of problems."""
        from .verify import verify

        return verify(self)

    def export(self, **options: Any) -> dict[str, Any]:
        """Write the corpus as of a time to a folder or tar; see `archive.export.export`."""
        from .export import export

        return export(self, **options)


class Reader:
    """Point-in-time reads inside one snapshot; the snapshot cannot change under it. The
    first TIMELINE_AFTER - 1 reads of a document are one indexed query each, like `show`;
    from then on the document's timeline (its events in effective-time order) is read once
    and every further read is a binary search, with a replay that walks the rows the cache
    remembers."""

    TIMELINE_ROWS = 250_000  # events kept in memory (tens of MB) before timelines are dropped
    # A timeline costs about as much as 40 indexed reads (100 events of the scale workload:
    # 600 us against 15; its events lie on as many pages): it is read once a document has
    # been asked for this often, so a few reads each of many documents stay indexed reads.
    TIMELINE_AFTER = 16

    def __init__(self, arc: Archive, cur: Cursor, known_at: int | None):
        self.arc, self.cur, self.known_at = arc, cur, known_at
        self._timelines: dict[str, tuple[list[int], list[Any]] | None] = {}
        self._asked: dict[str, int] = {}
        self._rows = 0

    def _timeline(self, key: str) -> tuple[list[int], list[Any]] | None:
        if key in self._timelines:
            return self._timelines[key]
        doc_id = self.cur.execute(_HOT_DOC, {"key": key}).fetchone()[0]
        timeline = None
        if doc_id is not None:
            params = {"doc": doc_id, "known": self.known_at}
            rows: list[Any] = self.cur.execute(
                _HOT_TIMELINE[self.known_at is not None], params
            ).fetchall()
            timeline = ([r[8] for r in rows], rows)
            self._rows += len(rows)
            if self._rows > self.TIMELINE_ROWS:
                self._timelines.clear()
                self._rows = len(rows)
        self._timelines[key] = timeline
        return timeline

    def at(self, key: str, at: TimeLike | None) -> Snapshot | None:
        """The version of `key` in effect at `at`, or None where it did not exist."""
        found = self.resolve(key, at)
        return self.snapshot(found) if found is not None else None

    def resolve(self, key: str, at: TimeLike | None) -> Event | None:
        """The event in effect for `key` at `at` (None: absent or deleted), without its bytes."""
        at_us = to_us(at)
        when = at_us if at_us is not None else _LATEST
        asked = self._asked[key] = self._asked.get(key, 0) + 1
        if asked < self.TIMELINE_AFTER and key not in self._timelines:
            params: dict[str, Any] = {"key": key, "at": when}
            if self.known_at is not None:
                params["known"] = self.known_at
            row = self.cur.execute(_HOT_AT[self.known_at is not None], params).fetchone()
            found = _event(row) if row is not None else None
        else:
            timeline = self._timeline(key)
            if timeline is None:
                return None
            times, rows = timeline
            # Rows are in (effective_at, seq) order: the last one at or before is in effect.
            index = bisect_right(times, when) - 1
            if index < 0:
                return None
            found = rows[index]
            if not isinstance(found, Event):
                found = rows[index] = _event(found)  # built once per version read
        if found is None or found.content_id is None:  # absent, or a deletion
            return None
        return found

    def snapshot(self, found: Event) -> Snapshot:
        """The event's verified bytes."""
        assert found.content_id is not None
        return Snapshot(found, load_one(self.cur, found.content_id, self.arc.cache))

    def prefetch(self, events: Iterable[Event]) -> None:
        """Rebuild the contents of many events ahead, in bulk (one chain query per 500
        contents, each replay starting from the one before), into the cache, for the
        `snapshot` calls that follow. Up to a quarter of the cache; a damaged content is left
        for its own `snapshot` to report."""
        cache = self.arc.cache
        wanted = ((ev.content_id, ev.size) for ev in events if ev.content_id is not None)
        preload(self.cur, wanted, cache, self.prefetch_room, keep=True)

    @property
    def prefetch_room(self) -> int:
        """Bytes of contents one `prefetch` rebuilds at most: a quarter of the cache."""
        return self.arc.cache.budget // 4


def _rename(
    conn: Connection,
    old: str,
    new: str,
    at: int | None,
    now: int,
    recorded_at: int,
    position: int,
) -> Recorded:
    """One `renamed` event: same content, new key; the old name stays findable."""
    effective = at if at is not None else now
    row = conn.execute(select(documents).where(documents.c.key == old)).first()
    if row is None or row.content_id is None:
        raise NotFound(f"no live document {old!r} to rename")
    if old == new:
        return Recorded(new, "unchanged")
    taken = conn.execute(select(documents).where(documents.c.key == new)).first()
    if taken is not None and taken.content_id is not None:
        raise BadInput(f"cannot rename {old!r} to {new!r}: a live document has that name")
    if taken is not None:  # a deleted document releases its name to the renamed one
        conn.execute(documents.update().where(documents.c.id == taken.id).values(key=None))
    size, sha = conn.execute(
        select(contents.c.size, contents.c.sha256).where(contents.c.id == row.content_id)
    ).one()
    fields = dict(
        position=position,
        doc_id=row.id,
        seq=row.seq + 1,
        type=RENAMED,
        key=new,
        sha256=bytes(sha),
        size=size,
        recorded_at=recorded_at,
        effective_at=max(effective, row.eff_at),
        meta={"from": old},
    )
    event_hash = hash_event(bytes(row.head_hash), **fields)
    conn.execute(
        events.insert(),
        _event_row(fields, row.content_id, event_hash),
    )
    conn.execute(
        documents.update()
        .where(documents.c.id == row.id)
        .values(key=new, seq=row.seq + 1, head_hash=event_hash, eff_at=fields["effective_at"])
    )
    exists = conn.execute(
        select(doc_names.c.key).where(doc_names.c.key == new, doc_names.c.doc_id == row.id)
    ).first()
    if exists is None:
        conn.execute(doc_names.insert(), {"key": new, "doc_id": row.id})
    return Recorded(new, RENAMED, Event(event_hash=event_hash, content_id=row.content_id, **fields))


_CLOCK = (
    "SELECT (SELECT max(position) FROM events),"
    " (SELECT recorded_at FROM events ORDER BY position DESC LIMIT 1),"
    " (SELECT max(id) FROM documents), (SELECT max(id) FROM contents)"
)


def _clock(cur: Cursor) -> tuple[int, int, int, int, int]:
    """(now, recorded_at, next position, next document id, next content id) under the
    writers' lock, in one statement. recorded_at never goes backwards along positions, so
    "known at T" is a prefix of the global stream."""
    now = timeparse.now_us()
    position, last_recorded, doc_id, content_id = cur.execute(_CLOCK).fetchone()
    recorded_at = now if last_recorded is None else max(now, last_recorded)
    return now, recorded_at, (position or 0) + 1, (doc_id or 0) + 1, (content_id or 0) + 1


def _event_row(fields: dict[str, Any], content_id: int | None, event_hash: bytes) -> dict:
    return {
        "position": fields["position"],
        "doc_id": fields["doc_id"],
        "seq": fields["seq"],
        "type": TYPE_CODES[fields["type"]],
        "key": fields["key"],
        "content_id": content_id,
        "size": fields["size"],
        "recorded_at": fields["recorded_at"],
        "effective_at": fields["effective_at"],
        "meta": _meta_json(fields["meta"]) if fields["meta"] else None,
        "event_hash": event_hash,
    }


# json.dumps(meta, sort_keys=True), with the encoder made once instead of per event.
_meta_json = json.JSONEncoder(sort_keys=True).encode

_DOCS_BY_KEY = "SELECT id, key, seq, head_hash, eff_at, content_id FROM documents WHERE key IN "
_CONTENTS_BY_HASH = "SELECT id, sha256, size, depth, base_id FROM contents WHERE sha256 IN "
_CONTENTS_BY_ID = "SELECT id, sha256, size, depth, base_id FROM contents WHERE id IN "
_IN_EFFECT = (
    "SELECT seq, effective_at, type, content_id FROM events "
    "WHERE doc_id = :doc AND effective_at <= :at ORDER BY effective_at DESC, seq DESC LIMIT 1"
)
_INSERT_CONTENT = (
    "INSERT INTO contents (id, sha256, size, base_id, depth, codec, data)"
    " VALUES (:id, :sha256, :size, :base_id, :depth, :codec, :data)"
)
_INSERT_DOCUMENT = (
    "INSERT INTO documents (id, key, seq, head_hash, eff_at, content_id)"
    " VALUES (:id, :key, :seq, :head_hash, :eff_at, :content_id)"
)
_INSERT_NAME = "INSERT INTO doc_names (key, doc_id) VALUES (:key, :id)"
_UPDATE_DOCUMENT = (
    "UPDATE documents SET seq = :seq, head_hash = :head_hash, eff_at = :eff_at,"
    " content_id = :content_id WHERE id = :id"
)
_INSERT_EVENT = (
    "INSERT INTO events (position, doc_id, seq, type, key, content_id, size, recorded_at,"
    " effective_at, meta, event_hash) VALUES (:position, :doc_id, :seq, :type, :key,"
    " :content_id, :size, :recorded_at, :effective_at, :meta, :event_hash)"
)


# Bytes of bases a batch reads ahead in bulk (see _BatchWriter._load_bases), at most.
BASES_UP_TO = 32 << 20
# Other bases tried for a large change, and what counts as large: a stored delta over 512
# bytes and over a 32nd of the new text. Over 512 bytes alone, a section that comes and goes
# on a 280 KB page of the real history cost 430-620 bytes instead of 2.7-3.1 KB (16 KB of the
# database in all), but ranking three times as many changes cost 5-10 % of the import.
BASES_TRIED = 4
_RECENT_CONTENTS = (
    "SELECT content_id FROM events WHERE doc_id = :doc AND content_id IS NOT NULL"
    " ORDER BY seq DESC LIMIT 16"
)


# Contents from this size rebase a full chain on its keyframe (`_rebased`). A rebase costs a
# coarse diff of versions far apart, about 1.5 ms on the chain workload's 21 KB page: there
# it saved 16 % of the database and cost 18 % of the ingest.
REBASE_FROM = 32 << 10


def _missing(lines: set[bytes], base_lines: set[bytes]) -> int:
    """Bytes of the new version's distinct lines found nowhere in the base: a cheap estimate
    of the text a delta on that base must insert, which sees a section restored or a
    paragraph moved back where a common prefix and suffix see a change from end to end."""
    return sum(map(len, lines - base_lines))


def _large(row: dict[str, Any], data: bytes) -> bool:
    return len(row["data"]) > 512 and len(row["data"]) * 32 > len(data)


class _BatchWriter:
    """One write transaction recording a batch: decisions in memory, inserts in bulk.

    `run` may be retried after a lost race, so it keeps nothing between attempts; contents it
    rebuilt or created reach the shared cache only in `publish`, after the commit.
    """

    def __init__(self, arc: Archive, batch: list[Version]):
        self.arc = arc
        self.batch = batch
        self.hashes = [content.sha256(bytes(v.data)) if v.data is not None else None for v in batch]

    def run(self, conn: Connection) -> list[Recorded]:
        # Driver level: SQLAlchemy's per-statement cost would be most of a one-version write.
        self.cur = cur = self.arc.store.cursor(conn)
        self.now, self.recorded_at, self.position, self.next_doc, self.next_content = _clock(cur)
        self.start = (self.position, self.next_doc, self.next_content)
        self.docs: dict[str, _DocState] = {}
        self.contents: dict[bytes, _ContentState] = {}
        self.contents_by_id: dict[int, _ContentState] = {}
        self.new_contents: list[dict] = []
        self.new_events: list[dict] = []
        # Events of this batch per document: (seq, effective_at, content id or None).
        self.pending: dict[int, list[tuple[int, int, int | None]]] = {}
        # Contents this batch created: their bytes, and whether they are text (None: unknown).
        self.fresh: dict[int, tuple[bytes, bool | None]] = {}
        self.bases: dict[int, bytes] = {}  # read ahead by _load_bases
        self.line_sets: dict[bytes, set[bytes]] = {}  # by SHA-256, see _lines
        self._full: tuple[bytes, tuple[int, bytes]] | None = None  # see _full_copy
        self._prefetch()
        results = [self._one(v, h) for v, h in zip(self.batch, self.hashes, strict=True)]
        self._flush()
        return results

    def publish(self) -> None:
        """After the commit: what it made reaches the shared cache, and the documents' states
        the next batch's `_prefetch` may take as they are."""
        changed = []
        for key, doc in self.docs.items():
            head = None
            if doc.content_id is not None:
                head = self.contents_by_id.get(doc.content_id)
            if head is None and doc.content_id is not None:  # not known here: not kept
                changed.append((key, None))
                continue
            doc.is_new = doc.dirty = False  # this batch is done with it: kept as it is
            changed.append((key, (doc, head)))
        end = (self.position, self.next_doc, self.next_content)
        self.arc.last_write.publish(self.start, end, changed)
        for content_id, (data, _is_text) in self.fresh.items():
            self.arc.cache.put(content_id, data)
        self.arc.cache.keep_rows(
            (r["id"], r["sha256"], r["size"], r["base_id"], r["codec"], r["data"])
            for r in self.new_contents
        )

    # -- reading what the batch needs, in a few queries --------------------------------------

    def _prefetch(self) -> None:
        keys = list({v.key for v in self.batch})
        known = self.arc.last_write.valid_at(self.start)
        if known is not None:
            unknown = []
            for key in keys:
                entry = known.get(key)
                if entry is None:
                    unknown.append(key)
                    continue
                doc, head = entry
                self.docs[key] = replace(doc)  # this attempt's own copy: it may be retried
                if head is not None:
                    self.contents[head.sha256] = head
                    self.contents_by_id[head.id] = head
            keys = unknown
        for r in self._select_in(_DOCS_BY_KEY, keys):
            self.docs[r[1]] = _DocState(r[0], r[1], r[2], bytes(r[3]), r[4], r[5])
        hashes = list({h for h in self.hashes if h and h not in self.contents})
        for r in self._select_in(_CONTENTS_BY_HASH, hashes):
            self._known_content(r)
        heads = [
            d.content_id
            for d in self.docs.values()
            if d.content_id is not None and d.content_id not in self.contents_by_id
        ]
        for r in self._select_in(_CONTENTS_BY_ID, heads):
            self._known_content(r)
        self._load_bases()

    def _load_bases(self) -> None:
        """The bytes of the bases this batch will diff against, read in bulk: one chain query
        per 500 documents instead of one each, when a batch spans many documents whose last
        versions have left the cache. At most BASES_UP_TO bytes are held."""
        wanted = []
        for v, sha in zip(self.batch, self.hashes, strict=True):
            doc = self.docs.get(v.key)
            if sha is None or sha in self.contents or doc is None or doc.content_id is None:
                continue
            state = self.contents_by_id.get(doc.content_id)
            if state is not None and self._has_room(doc.content_id):  # else: a keyframe
                wanted.append((doc.content_id, state.size))
        self.bases = preload(self.cur, wanted, self.arc.cache, BASES_UP_TO, keep=False)

    def _select_in(self, sql: str, values: list[Any]) -> Iterator[Any]:
        for start in range(0, len(values), 500):
            fragment, params = Cursor.in_list("v", values[start : start + 500])
            yield from self.cur.execute(sql + fragment, params).fetchall()

    def _known_content(self, r: Any) -> None:
        state = _ContentState(r[0], bytes(r[1]), r[2], r[3], r[4])
        self.contents[state.sha256] = state
        self.contents_by_id[state.id] = state

    def _content_by_id(self, content_id: int) -> _ContentState:
        state = self.contents_by_id.get(content_id)
        if state is None:
            for r in self._select_in(_CONTENTS_BY_ID, [content_id]):
                self._known_content(r)
            state = self.contents_by_id[content_id]
        return state

    def _in_effect(self, doc: _DocState, at: int) -> int | None:
        """Content id in effect at `at` (None: absent or deleted), this batch included."""
        if at >= doc.eff_at:
            return doc.content_id
        best: tuple[int, int, int | None] | None = None  # (effective_at, seq, content id)
        if not doc.is_new:
            r = self.cur.execute(_IN_EFFECT, {"doc": doc.id, "at": at}).fetchone()
            if r is not None:
                seq, effective_at, type_, content_id = r
                deleted = type_ == TYPE_CODES[DELETED]
                best = (effective_at, seq, None if deleted else content_id)
        for seq, eff, cid in self.pending.get(doc.id, []):
            if eff <= at and (best is None or (eff, seq) > best[:2]):
                best = (eff, seq, cid)
        return best[2] if best is not None else None

    # -- deciding ----------------------------------------------------------------------------

    def _one(self, v: Version, sha: bytes | None) -> Recorded:
        at = v.at if v.at is not None else self.now
        doc = self.docs.get(v.key)
        current = self._in_effect(doc, at) if doc is not None else None
        if v.expect is not None:
            found = self._content_by_id(current).sha256 if current is not None else ABSENT
            if found != v.expect:
                return Recorded(v.key, "conflict")
        if v.data is None:
            if current is None:
                return Recorded(v.key, "absent")
            return Recorded(v.key, DELETED, self._append(doc, DELETED, at, None, v.meta))
        assert sha is not None
        known = self.contents.get(sha)
        if current is not None and known is not None and known.id == current and not v.always:
            return Recorded(v.key, "unchanged")
        if doc is None:
            doc = self._new_doc(v.key)
        if known is None:
            base = current if current is not None else doc.content_id
            known = self._new_content(bytes(v.data), sha, base, doc)
        kind = MODIFIED if current is not None else CREATED
        return Recorded(v.key, kind, self._append(doc, kind, at, known, v.meta))

    def _new_doc(self, key: str) -> _DocState:
        doc = _DocState(self.next_doc, key, 0, GENESIS, -_LATEST, None, is_new=True, dirty=True)
        self.next_doc += 1
        self.docs[key] = doc
        return doc

    def _new_content(
        self, data: bytes, sha: bytes, base_id: int | None, doc: _DocState
    ) -> _ContentState:
        row: dict[str, Any] | None = None
        text: bool | None = None  # unknown until it matters
        # A full chain ends in a keyframe, or for a large page in a delta on the chain's own
        # keyframe (`_rebased`): other bases are tried only when the chain has room (else
        # older bases would keep long chains from ever ending).
        if len(data) <= content.DELTA_UP_TO and base_id is not None:
            try:
                if self._has_room(base_id):
                    row = self._delta_row(data, base_id)
                    if row is None or _large(row, data):
                        row = self._better_base(doc, data, sha, base_id, row)
                else:
                    row = self._rebased(data, base_id)
            except UnicodeDecodeError:  # not text: stored whole, and never a base
                row, text = None, False
        if row is None:
            codec, blob = self._full_copy(data)
            row = {"base_id": None, "depth": 0, "codec": codec, "data": blob}
        else:
            text = True  # a delta is only ever made to a text
        self._full = None  # the full copy is not kept past its content
        state = _ContentState(self.next_content, sha, len(data), row["depth"], row["base_id"])
        self.next_content += 1
        row.update(id=state.id, sha256=sha, size=len(data))
        self.new_contents.append(row)
        self.contents[sha] = state
        self.contents_by_id[state.id] = state
        self.fresh[state.id] = (data, text)
        return state

    def _delta_row(
        self, data: bytes, base_id: int, *, coarse: bool = False
    ) -> dict[str, Any] | None:
        """A delta against the base if the chain has room, the base is text and the delta is
        smaller (coarse: see `delta.make`). Raises UnicodeDecodeError if `data` is not text."""
        if not self._has_room(base_id):
            return None
        base_data = self._bytes(base_id)
        if not self._is_text(base_id, base_data):
            return None
        payload = delta.make(base_data, data, coarse=coarse)
        codec, blob = content.pack(payload, base_data)
        # Text seldom compresses below a third: the full copy is compressed for comparison only
        # when the delta is at least that large (a rare miss costs bytes, never exactness).
        if len(blob) * 3 >= len(data) and len(blob) >= len(self._full_copy(data)[1]):
            return None
        depth = self._content_by_id(base_id).depth + 1
        return {"base_id": base_id, "depth": depth, "codec": codec, "data": blob}

    def _rebased(self, data: bytes, base_id: int) -> dict[str, Any] | None:
        """When the base's chain is full: a delta against that chain's keyframe instead, if it
        is under half a full copy. A document that changes in place (a date, a section that
        comes and goes) has drifted little from it, and the keyframe this replaces can cost
        ten times the delta (on the real history, 13.6 and 14.8 KB keyframes became deltas
        of 1,070 and 528 bytes).
        The delta is coarse (`delta.make`) and compressed against the keyframe: a fine diff
        of versions 50 or more apart cost 2-16 ms. The chain starts again at depth 1, so
        replays stay within keyframe_interval deltas; later full chains rebase on the same
        keyframe until the drift makes it not pay."""
        if len(data) < REBASE_FROM:
            return None
        root = self._content_by_id(base_id)
        while root.base_id is not None:
            root = self._content_by_id(root.base_id)
        if root.size * 4 < len(data):  # the keyframe could not supply most of it
            return None
        root_data = self._bytes(root.id)
        if not self._is_text(root.id, root_data):
            return None
        codec, blob = content.pack(delta.make(root_data, data, coarse=True), root_data)
        if len(blob) * 2 >= len(self._full_copy(data)[1]):
            return None
        return {"base_id": root.id, "depth": 1, "codec": codec, "data": blob}

    def _full_copy(self, data: bytes) -> tuple[int, bytes]:
        """The content being written, compressed whole: once, whether it is only compared
        with a delta or then stored as the keyframe (a 283 KB page took milliseconds)."""
        if self._full is None or self._full[0] is not data:
            self._full = (data, content.pack(data))
        return self._full[1]

    def _has_room(self, base_id: int) -> bool:
        """Whether a delta on this base keeps its chain within keyframe_interval deltas."""
        return self._content_by_id(base_id).depth < self.arc.keyframe_interval

    def _is_text(self, content_id: int, data: bytes) -> bool:
        """Whether a base is text. Deltas are made only to texts, so only a keyframe (one in
        every keyframe_interval contents) is ever decoded to find out."""
        fresh = self.fresh.get(content_id)
        if fresh is not None and fresh[1] is not None:
            return fresh[1]
        if self._content_by_id(content_id).depth > 0:
            return True
        text = len(data) <= content.DELTA_UP_TO and content.is_text(data)
        if fresh is not None:
            self.fresh[content_id] = (data, text)
        return text

    def _better_base(
        self, doc: _DocState, data: bytes, sha: bytes, tried: int, best: dict | None
    ) -> dict[str, Any] | None:
        """A large change (a page back from an error stub, a section restored) is often
        small against an earlier version: the document's last few other contents are tried
        as bases and the smallest delta kept. Decided by the stored history alone."""
        # Newest first: this batch's own versions, then the stored ones (so the choice does
        # not depend on how writes were batched).
        recent = [cid for _seq, _at, cid in reversed(self.pending.get(doc.id, []))
                  if cid is not None]
        if not doc.is_new:
            recent += [r[0] for r in self.cur.execute(_RECENT_CONTENTS, {"doc": doc.id})]
        # Diffs of large changes are the costly ones: the candidates are ranked by the bytes
        # of lines they lack (`_missing`), and only a clearly closer one is diffed.
        ranked = []
        lines = self._lines(sha, lambda: data)
        for candidate in list(dict.fromkeys(c for c in recent if c != tried))[:BASES_TRIED]:
            if self._has_room(candidate):
                ranked.append((_missing(lines, self._lines_of(candidate)), candidate))
        if not ranked:
            return best
        distance, closest = min(ranked)
        if distance * 2 > _missing(lines, self._lines_of(tried)):
            return best
        row = self._delta_row(data, closest, coarse=len(data) >= REBASE_FROM)
        if row is not None and (best is None or len(row["data"]) < len(best["data"])):
            return row
        return best

    def _lines(self, sha: bytes, read: Callable[[], bytes]) -> set[bytes]:
        """The distinct lines of a content, kept for the batch: consecutive large changes of
        a document rank the same few candidates (splitting them again cost 7 % of the real
        history's import). Its bytes are read only the first time."""
        lines = self.line_sets.get(sha)
        if lines is None:
            lines = self.line_sets[sha] = set(read().split(b"\n"))
        return lines

    def _lines_of(self, content_id: int) -> set[bytes]:
        sha = self._content_by_id(content_id).sha256
        return self._lines(sha, lambda: self._bytes(content_id))

    def _bytes(self, content_id: int) -> bytes:
        fresh = self.fresh.get(content_id)
        if fresh is not None:
            return fresh[0]
        loaded = self.bases.get(content_id)
        return loaded if loaded is not None else load_one(self.cur, content_id, self.arc.cache)

    def _append(
        self,
        doc: _DocState,
        kind: str,
        at: int,
        state: _ContentState | None,
        meta: dict[str, Any] | None,
    ) -> Event:
        fields = dict(
            position=self.position,
            doc_id=doc.id,
            seq=doc.seq + 1,
            type=kind,
            key=doc.key,
            sha256=state.sha256 if state else None,
            size=state.size if state else 0,
            recorded_at=self.recorded_at,
            effective_at=at,
            meta=meta,
        )
        event_hash = hash_event(doc.head_hash, **fields)
        content_id = state.id if state else None
        self.new_events.append(_event_row(fields, content_id, event_hash))
        self.pending.setdefault(doc.id, []).append((doc.seq + 1, at, content_id))
        self.position += 1
        doc.seq += 1
        doc.head_hash = event_hash
        doc.dirty = True
        if at >= doc.eff_at:
            doc.eff_at = at
            doc.content_id = content_id
        return Event(event_hash=event_hash, content_id=content_id, **fields)

    # -- writing -------------------------------------------------------------------------

    def _flush(self) -> None:
        cur = self.cur
        if self.new_contents:
            cur.executemany(_INSERT_CONTENT, self.new_contents)
        new_docs = [
            {
                "id": d.id,
                "key": d.key,
                "seq": d.seq,
                "head_hash": d.head_hash,
                "eff_at": d.eff_at,
                "content_id": d.content_id,
            }
            for d in self.docs.values()
            if d.is_new
        ]
        if new_docs:
            cur.executemany(_INSERT_DOCUMENT, new_docs)
            cur.executemany(_INSERT_NAME, new_docs)
        changed = [
            {
                "id": d.id,
                "seq": d.seq,
                "head_hash": d.head_hash,
                "eff_at": d.eff_at,
                "content_id": d.content_id,
            }
            for d in self.docs.values()
            if d.dirty and not d.is_new
        ]
        if changed:
            cur.executemany(_UPDATE_DOCUMENT, changed)
        if self.new_events:
            cur.executemany(_INSERT_EVENT, self.new_events)
