"""Replay: keyframe + deltas → the exact bytes of a content, checked against its SHA-256.

A content is either a keyframe (a compressed full copy) or a delta against a base content;
following base links reaches a keyframe after at most K deltas. Chains are fetched in one
recursive query per batch, rebuilt from the nearest cached ancestor, and every rebuilt content
is hashed before it is returned or cached, so a wrong base or a damaged blob fails loudly.
Everything stays bytes: deltas count UTF-8 bytes (see delta.UTF8_FORM), so nothing is decoded.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from . import content, delta
from .errors import Damaged
from .store import Cursor


class ContentCache:
    """What replay keeps between reads, all of it derived from immutable rows:

    - rebuilt contents in a byte-bounded LRU, keyed by content id. A content a read asked for
      is verified (its size and SHA-256 checked); the contents a replay passed through on its
      way up the chain are kept too, marked unchecked: they serve as bases at once (the result
      built on them is checked, always), and are checked before they are ever returned.
    - the stored rows of deltas already read or written (a few dozen bytes each, decompressed
      when first used), so that a chain reaching a cached content is walked in memory instead
      of asked of the database.
    """

    def __init__(self, budget: int = 64 << 20):
        self.budget = budget
        self.used = 0
        self._checked: OrderedDict[int, bytes] = OrderedDict()  # least recently used first
        # Passed on the way, not asked for, oldest first: they take free room or each
        # other's, and go first, so a replay up a long chain (a batch walking forward in
        # time) never pushes out what reads asked for.
        self._passed: OrderedDict[int, bytes] = OrderedDict()
        self.rows: dict[int, Any] = {}
        self._rows_used = 0

    def get(self, content_id: int) -> bytes | None:
        """A cached content, checked or not: fit to be a base, not to be returned."""
        item = self._checked.get(content_id)
        if item is not None:
            self._checked.move_to_end(content_id)
            return item
        return self._passed.get(content_id)

    def checked(self, content_id: int) -> bool:
        return content_id in self._checked

    def holds(self, content_id: int) -> bool:
        return content_id in self._checked or content_id in self._passed

    def put(self, content_id: int, item: bytes, *, checked: bool = True) -> None:
        if len(item) > self.budget // 4 or content_id in self._checked:
            return
        if not checked:
            if content_id in self._passed:
                return
            while self._passed and self.used + len(item) > self.budget:
                self.used -= len(self._passed.popitem(last=False)[1])
            if self.used + len(item) <= self.budget:
                self._passed[content_id] = item
                self.used += len(item)
            return
        passed = self._passed.pop(content_id, None)
        if passed is not None:
            self.used -= len(passed)
        while self.used + len(item) > self.budget:
            victims = self._passed if self._passed else self._checked
            self.used -= len(victims.popitem(last=False)[1])
        self._checked[content_id] = item
        self.used += len(item)

    def forget_unchecked(self) -> None:
        """Drop every unchecked content (after a replay built on one failed its check)."""
        self.used -= sum(map(len, self._passed.values()))
        self._passed.clear()

    def keep_rows(self, rows: Iterable[Any]) -> None:
        """Remember stored delta rows as read (keyframes are remembered rebuilt, by `put`);
        a row is decompressed when a replay first uses it (`payload`). Past a quarter of the
        budget the rows are all dropped: cheaper than an LRU per row."""
        for row in rows:
            data = row[_DATA]
            if row[_BASE] is None or data is None or len(data) > _ROW_UP_TO:
                continue
            if row[_ID] in self.rows:
                continue
            if self._rows_used > self.budget // 4:
                self.rows.clear()
                self._rows_used = 0
            self.rows[row[_ID]] = tuple(row)
            self._rows_used += len(data) + _ROW_OVERHEAD

    def payload(self, row: Any, base: bytes) -> bytes:
        """A row's delta, decompressed; a remembered row is decompressed once, unless it was
        compressed against its base (that base may be an unchecked one, and wrong)."""
        kept = self.rows.get(row[_ID])
        if kept is not None:
            row = kept
        if row[_CODEC] == content.RAW:
            return bytes(row[_DATA])
        if row[_CODEC] == content.ZSTD_BASE:
            return content.unpack(content.ZSTD_BASE, row[_DATA], base)
        data = content.unpack(row[_CODEC], row[_DATA])
        if kept is not None:
            self.rows[row[_ID]] = (*kept[:_CODEC], content.RAW, data)
            self._rows_used += len(data) - len(kept[_DATA])
        return data

    def clear(self) -> None:
        self._checked.clear()
        self._passed.clear()
        self.used = 0
        self.rows.clear()
        self._rows_used = 0


_ROW_UP_TO = 64 << 10  # larger deltas are read again when needed
_ROW_OVERHEAD = 200  # bytes a kept row costs beyond its data (tuple, ints, hash)


# Contents and their bases down to the keyframes. Several chains may share bases, so ids are
# collected first (UNION drops repeats) and each row is read once.
_CHAIN = """
    WITH RECURSIVE chain(id) AS (
        SELECT id FROM contents WHERE id IN {ids}
        UNION
        SELECT c.base_id FROM contents c JOIN chain ON c.id = chain.id
        WHERE c.base_id IS NOT NULL
    )
    SELECT c.id, c.sha256, c.size, c.base_id, c.codec, c.data
    FROM contents c WHERE c.id IN (SELECT id FROM chain)
"""
# Stored rows by id, without their chains (for `keep_rows`).
_ROWS = "SELECT id, sha256, size, base_id, codec, data FROM contents WHERE id IN {ids}"

# One chain (the hot path of a read), from one content down, at most :limit rows: rows are
# fetched as the recursion reaches them, and the LIMIT stops the recursion (SQLite and
# PostgreSQL both evaluate it lazily). A base is always older than its delta; requiring it
# keeps a damaged (cyclic) chain from recursing forever: it ends early, and replay reports the
# chain broken.
_CHAIN_UP_TO = """
    WITH RECURSIVE chain(id, sha256, size, base_id, codec, data) AS (
        SELECT id, sha256, size, base_id, codec, data FROM contents WHERE id = :id
        UNION ALL
        SELECT c.id, c.sha256, c.size, c.base_id, c.codec, c.data
        FROM chain JOIN contents c ON c.id = chain.base_id AND c.id < chain.id
    )
    SELECT id, sha256, size, base_id, codec, data FROM chain LIMIT :limit
"""

# Columns of a chain row.
_ID, _SHA, _SIZE, _BASE, _CODEC, _DATA = range(6)


def load(
    cur: Cursor, ids: Iterable[int], cache: ContentCache, *, keep: bool = True
) -> dict[int, bytes]:
    """The verified contents of `ids`, rebuilt with as few queries as the cache allows
    (export, versions, a batch's prefetch, a write batch's bases): chains are fetched 500 at
    a time, and their delta rows remembered by the cache, as `load_one` does. With
    keep=False the results go to no cache and no rows are remembered (an export reads each
    content once): a private cache holds bases while they are needed."""
    if not keep:
        cache = _Overlay(cache)
    found: dict[int, bytes] = {}
    missing = []
    for content_id in dict.fromkeys(ids):
        if cache.checked(content_id):
            found[content_id] = cache.get(content_id)  # type: ignore[assignment]
            continue
        walked = _gather(None, content_id, cache)
        if walked is None:
            missing.append(content_id)
        else:
            found[content_id] = _rebuild_checked(cur, content_id, walked, cache)
    for chunk, fetched in _fetched_in(cur, _CHAIN, missing):
        cache.keep_rows(fetched)  # an _Overlay keeps none
        rows = {row[_ID]: row for row in fetched}
        for content_id in chunk:
            found[content_id] = _rebuild_checked(cur, content_id, rows, cache)
    return found


def _fetched_in(cur: Cursor, sql: str, ids: list[int]) -> Iterator[tuple[list[int], list]]:
    """(ids, rows) of a query on `IN {ids}`, 500 ids at a time."""
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        fragment, params = Cursor.in_list("i", chunk)
        yield chunk, cur.execute(sql.format(ids=fragment), params).fetchall()


def preload(
    cur: Cursor, wanted: Iterable[tuple[int, int]], cache: ContentCache, room: int, *, keep: bool
) -> dict[int, bytes]:
    """Contents read ahead in bulk (`load`) for the reads or diffs that follow: of the
    (id, size) pairs, those not cached, each once, while their sizes fit in `room` bytes.
    With `keep`, the stored rows of those that do not fit are remembered (`keep_rows`), so
    that each is rebuilt when asked from the version before it, without a query of its own.
    A content that cannot be rebuilt may never be needed: then nothing is returned, and each
    read reports it where it is needed, if it is."""
    ids: dict[int, None] = {}
    rest: dict[int, None] = {}
    for content_id, size in wanted:
        if content_id in ids or content_id in rest or cache.checked(content_id):
            continue
        if size <= room:
            ids[content_id] = None
            room -= size
        elif keep and content_id not in cache.rows:
            rest[content_id] = None
    for _chunk, fetched in _fetched_in(cur, _ROWS, list(rest)):
        cache.keep_rows(fetched)
    if len(ids) < 2:  # one is read as well on its own
        return {}
    try:
        return load(cur, ids, cache, keep=keep)
    except Damaged:
        return {}


def load_one(cur: Cursor, content_id: int, cache: ContentCache) -> bytes:
    """The verified content of one id (the hot path of a read): from the cache, or walked in
    memory to a cached ancestor, or with the rest of its chain fetched (`_gather`)."""
    if cache.checked(content_id):
        return cache.get(content_id)  # type: ignore[return-value]
    gathered = _gather(cur, content_id, cache)
    assert gathered is not None  # with a cursor, rows are fetched where not remembered
    return _rebuild_checked(cur, content_id, gathered, cache)


def _gather(cur: Cursor | None, content_id: int, cache: ContentCache) -> dict[int, Any] | None:
    """The rows from `content_id` down to a cached content or a keyframe (the first row is
    always included: it is what the result is checked against). Remembered rows are walked
    in memory; where one is missing the chain is fetched from there, a few rows first (most
    reads find a cached ancestor close by), then four times as many; without a cursor, None
    (a bulk load fetches those chains together)."""
    remembered = cache.rows
    gathered: dict[int, Any] = {}
    current: int | None = content_id
    limit = _FETCH_FIRST
    while current is not None:
        row = gathered.get(current) or remembered.get(current)
        if row is None:
            if cur is None:
                return None
            fetched = cur.execute(_CHAIN_UP_TO, {"id": current, "limit": limit}).fetchall()
            cache.keep_rows(fetched)
            gathered.update((r[_ID], r) for r in fetched)
            limit *= 4
            row = gathered.get(current)
            if row is None:
                break  # not stored: replay reports the chain broken
        gathered[current] = row
        if not _older_base(row) or cache.holds(current):  # held: only its row is needed
            break
        current = row[_BASE]
        if current is not None and cache.holds(current):
            break
    return gathered


_FETCH_FIRST = 8


def rebuild_row(cur: Cursor, row: Any, cache: ContentCache) -> bytes:
    """Rebuild and check one content from its own row (id, sha256, size, base_id, codec,
    data), its base taken from the cache or loaded: a walk over every content in order reads
    each row once (what verify does)."""
    base_id = row[_BASE]
    if base_id is not None and cache.get(base_id) is None:
        return load_one(cur, row[_ID], cache)  # the whole chain from storage
    return _rebuild_checked(cur, row[_ID], {row[_ID]: row}, cache)


class _Overlay(ContentCache):
    """A cache that reads through to another and keeps its own additions, for one bulk
    load: the shared cache is neither filled nor churned by contents read once."""

    def __init__(self, under: ContentCache):
        super().__init__(min(under.budget, 16 << 20))
        self.under = under
        self.rows = under.rows

    def get(self, content_id: int) -> bytes | None:
        own = super().get(content_id)
        return own if own is not None else self.under.get(content_id)

    def checked(self, content_id: int) -> bool:
        return super().checked(content_id) or self.under.checked(content_id)

    def holds(self, content_id: int) -> bool:
        return super().holds(content_id) or self.under.holds(content_id)

    def put(self, content_id: int, item: bytes, *, checked: bool = True) -> None:
        if checked:  # what a bulk load passes on the way up a chain is not needed again
            super().put(content_id, item)

    def keep_rows(self, rows: Iterable[Any]) -> None:
        pass  # a bulk load's rows are used once

    def payload(self, row: Any, base: bytes) -> bytes:
        return self.under.payload(row, base)  # the rows are the shared cache's

    def forget_unchecked(self) -> None:
        super().forget_unchecked()
        self.under.forget_unchecked()


class _UncheckedBase(Exception):
    """A replay built on an unchecked cached content did not match: that content may be
    wrong, so the chain is replayed again from storage."""


def _rebuild_checked(cur: Cursor, content_id: int, rows: dict[int, Any], cache: ContentCache):
    try:
        return _rebuild(content_id, rows, cache)
    except _UncheckedBase:
        cache.forget_unchecked()  # the rows are storage's: only the unchecked bases go
        again = _gather(cur, content_id, cache)
        assert again is not None
        return _rebuild(content_id, again, cache)


def _rebuild(content_id: int, rows: dict[int, Any], cache: ContentCache) -> bytes:
    # Walk down to the nearest cached ancestor or keyframe, apply the deltas upwards and
    # check the result's size and SHA-256; the contents passed on the way are cached,
    # unchecked. Only on a mismatch is the chain replayed step by step, each step checked,
    # to name the content that is damaged.
    chain = []
    current: int | None = content_id
    base: bytes | None = None
    base_checked = True
    while current is not None:
        base = cache.get(current)
        if base is not None and (chain or cache.checked(current)):
            base_checked = cache.checked(current)
            break
        row = rows.get(current)
        if row is None or not _older_base(row):
            raise Damaged(f"content {content_id}: its delta chain is broken at content {current}")
        if base is not None:  # the content itself, cached unchecked: check it now
            if _matches(row, base):
                cache.put(current, base)
                return base
            raise _UncheckedBase
        if row[_BASE] is None:
            base = _keyframe(row)
            cache.put(row[_ID], base)
            break
        chain.append(row)
        current = row[_BASE]
    assert base is not None
    if not chain:
        return base
    chain.reverse()
    data: bytes | None = base
    passed = []
    try:
        for steps, row in enumerate(chain, start=1):
            data = delta.apply_stored(data, cache.payload(row, data))
            if steps % PASSED_EVERY == 0 and steps < len(chain):  # the top is kept below
                passed.append((row[_ID], data))
    except (ValueError, UnicodeDecodeError, zlib.error):
        data = None
    top = chain[-1]
    if data is not None and _matches(top, data):
        for passed_id, step in passed:
            cache.put(passed_id, step, checked=False)
        cache.put(top[_ID], data)
        return data
    if not base_checked:
        raise _UncheckedBase
    return _rebuild_stepwise(base, chain, cache)


# Of the contents a replay passes on its way up a chain, every PASSED_EVERY-th is cached: a
# later read in that chain replays one delta more at most, and half as many copies are held.
# Holding them costs more than making them: a 20 KB result on fresh pages cost 20 µs here
# (5 page faults), on reused memory 8; cold chain reads took 0.45 ms instead of 0.62.
PASSED_EVERY = 2


def _matches(row: Any, data: bytes) -> bool:
    return len(data) == row[_SIZE] and content.sha256(data) == bytes(row[_SHA])


def _rebuild_stepwise(base: bytes, chain: list[Any], cache: ContentCache) -> bytes:
    """Each delta applied and checked on its own: raises Damaged naming the first bad one."""
    for row in chain:
        try:
            base = delta.apply_stored(base, cache.payload(row, base))
        except (ValueError, UnicodeDecodeError, zlib.error) as error:
            raise Damaged(f"content {row[_ID]}: delta does not apply: {error}") from None
        _check(row, base)
        cache.put(row[_ID], base)
    return base


def _older_base(row: Any) -> bool:
    """A delta's base is always an older content (smaller id); a row breaking that rule is
    damage, and following it could loop for ever."""
    return row[_BASE] is None or row[_BASE] < row[_ID]


def _keyframe(row: Any) -> bytes:
    try:
        data = content.unpack(row[_CODEC], row[_DATA])
    except (ValueError, zlib.error) as error:
        raise Damaged(f"content {row[_ID]}: stored blob cannot be read: {error}") from None
    _check(row, data)
    return data


def _check(row: Any, data: bytes) -> None:
    if len(data) != row[_SIZE] or content.sha256(data) != bytes(row[_SHA]):
        raise Damaged(
            f"content {row[_ID]}: rebuilt bytes do not match SHA-256 {bytes(row[_SHA]).hex()}"
        )
