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
from collections.abc import Iterable
from typing import Any

from . import content, delta
from .errors import Damaged
from .store import Cursor


class ContentCache:
    """A byte-bounded LRU of verified contents, keyed by content id (immutable rows)."""

    def __init__(self, budget: int = 64 << 20):
        self.budget = budget
        self.used = 0
        self._items: OrderedDict[int, bytes] = OrderedDict()

    def get(self, content_id: int) -> bytes | None:
        item = self._items.get(content_id)
        if item is not None:
            self._items.move_to_end(content_id)
        return item

    def holds(self, content_id: int) -> bool:
        return content_id in self._items

    def put(self, content_id: int, item: bytes) -> None:
        if len(item) > self.budget // 4 or content_id in self._items:
            return
        self._items[content_id] = item
        self.used += len(item)
        while self.used > self.budget:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)

    def clear(self) -> None:
        self._items.clear()
        self.used = 0


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
# One chain (the hot path of a read): rows fetched as the recursion reaches them. A base is
# always older than its delta; requiring it keeps a damaged (cyclic) chain from recursing
# forever: it ends early, and replay reports the chain broken.
_CHAIN_ONE = """
    WITH RECURSIVE chain(id, sha256, size, base_id, codec, data) AS (
        SELECT id, sha256, size, base_id, codec, data FROM contents WHERE id = :id
        UNION ALL
        SELECT c.id, c.sha256, c.size, c.base_id, c.codec, c.data
        FROM chain JOIN contents c ON c.id = chain.base_id AND c.id < chain.id
    )
    SELECT id, sha256, size, base_id, codec, data FROM chain
"""

# Columns of a chain row.
_ID, _SHA, _SIZE, _BASE, _CODEC, _DATA = range(6)


def load(cur: Cursor, ids: Iterable[int], cache: ContentCache) -> dict[int, bytes]:
    """The verified contents of `ids`, rebuilt with as few queries as the cache allows."""
    wanted = list(dict.fromkeys(ids))
    found: dict[int, bytes] = {}
    missing = []
    for content_id in wanted:
        hit = cache.get(content_id)
        if hit is None:
            missing.append(content_id)
        else:
            found[content_id] = hit
    for start in range(0, len(missing), 500):
        chunk = missing[start : start + 500]
        if len(chunk) == 1:
            rows_ = cur.execute(_CHAIN_ONE, {"id": chunk[0]}).fetchall()
        else:
            fragment, params = Cursor.in_list("i", chunk)
            rows_ = cur.execute(_CHAIN.format(ids=fragment), params).fetchall()
        rows = {row[_ID]: row for row in rows_}
        for content_id in chunk:
            found[content_id] = _rebuild(content_id, rows, cache)
    return found


def load_one(cur: Cursor, content_id: int, cache: ContentCache) -> bytes:
    hit = cache.get(content_id)
    if hit is not None:
        return hit
    rows = {row[_ID]: row for row in cur.execute(_CHAIN_ONE, {"id": content_id}).fetchall()}
    return _rebuild(content_id, rows, cache)


def load_with(cur: Cursor, content_id: int, cache: ContentCache, rows: dict[int, Any]) -> bytes:
    """`load_one`, taking chain rows from `rows` (fetched ahead by the caller) when they
    reach a cached content or a keyframe, else from storage."""
    hit = cache.get(content_id)
    if hit is not None:
        return hit
    current: int | None = content_id
    while current is not None and not cache.holds(current):
        row = rows.get(current)
        if row is None or not _older_base(row):
            return load_one(cur, content_id, cache)
        current = row[_BASE]
    return _rebuild(content_id, rows, cache)


def rebuild_row(cur: Cursor, row: Any, cache: ContentCache) -> bytes:
    """Rebuild and check one content from its own row (id, sha256, size, base_id, codec,
    data), its base taken from the cache or loaded: a walk over every content in order reads
    each row once (what verify does)."""
    base_id = row[_BASE]
    if base_id is not None and cache.get(base_id) is None:
        return load_one(cur, row[_ID], cache)  # the whole chain from storage
    return _rebuild(row[_ID], {row[_ID]: row}, cache)


def _rebuild(content_id: int, rows: dict[int, Any], cache: ContentCache) -> bytes:
    # Walk down to the nearest cached ancestor or keyframe, then apply the deltas upwards in
    # one pass and check the result's size and SHA-256. Only on a mismatch is the chain
    # replayed step by step, to name the content that is damaged.
    chain = []
    current: int | None = content_id
    base: bytes | None = None
    while current is not None:
        base = cache.get(current)
        if base is not None:
            break
        row = rows.get(current)
        if row is None or not _older_base(row):
            raise Damaged(f"content {content_id}: its delta chain is broken at content {current}")
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
    try:
        data = delta.apply_chain(base, [content.unpack(row[_CODEC], row[_DATA]) for row in chain])
    except (ValueError, UnicodeDecodeError, zlib.error):
        data = None
    if data is not None:
        top = chain[-1]
        if len(data) == top[_SIZE] and content.sha256(data) == bytes(top[_SHA]):
            cache.put(top[_ID], data)
            return data
    return _rebuild_stepwise(base, chain, cache)


def _rebuild_stepwise(base: bytes, chain: list[Any], cache: ContentCache) -> bytes:
    """Each delta applied and checked on its own: raises Damaged naming the first bad one."""
    for row in chain:
        try:
            base = delta.apply_chain(base, [content.unpack(row[_CODEC], row[_DATA])])
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
