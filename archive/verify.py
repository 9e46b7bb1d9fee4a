"""Verification: replay every content, recompute every event hash and chain, check the
document projection. Memory stays flat: contents and documents are walked in pages."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from .errors import Damaged
from .events import DELETED, GENESIS, TYPES, hash_event
from .replay import ContentCache, rebuild_row

if TYPE_CHECKING:
    from .api import Archive

PAGE = 500


def verify(arc: Archive) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    with arc.store.read() as conn:
        _verify_contents(arc, conn, problems)
        _verify_events(conn, problems)
    return problems


def _verify_contents(arc: Archive, conn, problems: list[dict[str, Any]]) -> None:
    # A private cache: verification must rebuild from storage, not trust earlier reads. Each
    # content is read once, in id order, and rebuilt on its base, which was verified just
    # before (bases precede their deltas); memory stays within the cache's budget.
    cache = ContentCache(64 << 20)
    cur = arc.store.cursor(conn)
    after = 0
    while True:
        rows = cur.execute(
            "SELECT c.id, c.sha256, c.size, c.base_id, c.codec, c.data, c.depth, b.depth "
            "FROM contents c LEFT JOIN contents b ON b.id = c.base_id "
            "WHERE c.id > :after ORDER BY c.id LIMIT :n",
            {"after": after, "n": PAGE},
        ).fetchall()
        if not rows:
            return
        after = rows[-1][0]
        for row in rows:
            content_id, base_id, depth, base_depth = row[0], row[3], row[6], row[7]
            expected = 0 if base_id is None else (base_depth or 0) + 1
            # K is a writer's setting, not stored: only the chain's own consistency is checked.
            if depth != expected:
                problems.append(
                    {"content": content_id, "problem": f"delta depth {depth} is inconsistent"}
                )
            try:
                rebuild_row(cur, row, cache)
            except Damaged as error:
                problems += _content_users(conn, content_id, str(error))


def _content_users(conn, content_id: int, problem: str) -> list[dict[str, Any]]:
    """A broken content, named by every event (document, version, position) that uses it."""
    users = conn.execute(
        text(
            "SELECT key, seq, position FROM events WHERE content_id = :id ORDER BY position"
        ),
        {"id": content_id},
    ).all()
    if not users:
        return [{"content": content_id, "problem": problem}]
    return [
        {"document": u.key, "seq": u.seq, "position": u.position, "content": content_id,
         "problem": problem}
        for u in users
    ]


def _verify_events(conn, problems: list[dict[str, Any]]) -> None:
    after = 0
    while True:
        docs = list(
            conn.execute(
                text(
                    "SELECT id, key, seq, head_hash FROM documents WHERE id > :after "
                    "ORDER BY id LIMIT :n"
                ),
                {"after": after, "n": PAGE},
            )
        )
        if not docs:
            return
        after = docs[-1].id
        for doc in docs:
            _verify_document(conn, doc, problems)


def _verify_document(conn, doc, problems: list[dict[str, Any]]) -> None:
    name = doc.key
    previous = GENESIS
    seq = 0
    rows = conn.execute(
        text(
            "SELECT e.position, e.seq, e.type, e.key, e.size, e.recorded_at, e.effective_at,"
            " e.meta, e.event_hash, e.content_id, c.sha256, c.size AS content_size "
            "FROM events e LEFT JOIN contents c ON c.id = e.content_id "
            "WHERE e.doc_id = :doc ORDER BY e.seq"
        ),
        {"doc": doc.id},
    )
    for row in rows:
        name = name or row.key
        where = {"document": row.key, "seq": row.seq, "position": row.position}
        seq += 1
        if row.seq != seq:
            problems.append({**where, "problem": f"sequence gap: expected {seq}"})
            seq = row.seq
        kind = TYPES[row.type] if 0 <= row.type < len(TYPES) else "?"
        if kind == DELETED and (row.content_id is not None or row.size != 0):
            problems.append({**where, "problem": "a deletion carries content"})
        if kind != DELETED and (row.content_id is None or row.size != row.content_size):
            problems.append({**where, "problem": "event size does not match its content"})
        expected = hash_event(
            previous,
            position=row.position,
            doc_id=doc.id,
            seq=row.seq,
            type=kind,
            key=row.key,
            sha256=bytes(row.sha256) if row.sha256 is not None else None,
            size=row.size,
            recorded_at=row.recorded_at,
            effective_at=row.effective_at,
            meta=json.loads(row.meta) if row.meta else None,
        )
        if expected != bytes(row.event_hash):
            problems.append({**where, "problem": "event hash does not match its fields or chain"})
        previous = bytes(row.event_hash)
    if seq != doc.seq or previous != bytes(doc.head_hash):
        problems.append(
            {"document": name, "problem": "document head does not match its last event"}
        )
