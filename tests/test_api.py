"""The library contract of issue 2, on a SQLite file and on a fresh PostgreSQL database:
events, content by hash, deltas and keyframes, exact replay at any time, immutability, schema.

Tests read what the issue promises (the words), not what the code happens to do: stored rows
are inspected only where the issue makes a promise about storage (one content per hash,
keyframes every K deltas, triggers in the database)."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import sqlite3
import time
import unicodedata
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import copy_stored_blob, raw_sql
from sqlalchemy import create_engine, make_url

from archive import Archive, ArchiveError, BadInput, Damaged, NotFound, Version

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "seeds"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- helpers -----------------------------------------------------------------------------------


def us(moment: str) -> int:
    """An ISO 8601 time with an offset as microseconds since the epoch (independent of the
    archive's own parser)."""
    dt = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    assert dt.tzinfo is not None
    return (dt - EPOCH) // timedelta(microseconds=1)


def now_us() -> int:
    return (datetime.now(UTC) - EPOCH) // timedelta(microseconds=1)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def seed(name: str) -> bytes:
    return next(SEEDS.glob(f"{name}_*.txt")).read_bytes()


def seed_lines(name: str, upto: int) -> bytes:
    """The first `upto` lines of a seed, cut from its own text (as the timeline does)."""
    return b"".join(seed(name).splitlines(keepends=True)[:upto])


def reader(db_url: str, **options) -> Archive:
    """A second archive object with no content cache: every read replays from storage."""
    return Archive(db_url, cache_bytes=0, **options)


def dialect(db_url: str) -> str:
    return make_url(db_url).get_backend_name()


def sqlite_path(db_url: str) -> str:
    return make_url(db_url).database


def raw_rows(db_url: str, query: str) -> list[tuple]:
    if dialect(db_url) == "sqlite":
        conn = sqlite3.connect(sqlite_path(db_url))
        try:
            return [tuple(r) for r in conn.execute(query).fetchall()]
        finally:
            conn.close()
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(query).fetchall()]
    finally:
        engine.dispose()


def content_rows(db_url: str) -> dict[int, dict]:
    """id -> {sha256, size, base_id, data} of every stored content."""
    rows = raw_rows(db_url, "SELECT id, sha256, size, base_id, data FROM contents")
    return {
        r[0]: {"sha256": bytes(r[1]), "size": r[2], "base_id": r[3], "data": bytes(r[4])}
        for r in rows
    }


def chain_length(rows: dict[int, dict], content_id: int) -> int:
    """Deltas between a content and its keyframe, following base links."""
    deltas = 0
    current = rows[content_id]
    while current["base_id"] is not None:
        deltas += 1
        current = rows[current["base_id"]]
        assert deltas <= len(rows), "a cycle in the delta chain"
    return deltas


def full_copy_size(data: bytes) -> int:
    """The size of the smallest reasonable full copy (raw or zlib-compressed)."""
    return min(len(data), len(zlib.compress(data, 9)))


def growing_versions(n: int) -> list[bytes]:
    """n versions of the live thread 002, growing line by line as in the seeds timeline."""
    lines = seed("002").splitlines(keepends=True)
    step = max(1, len(lines) // n)
    return [b"".join(lines[: step * (i + 1)]) for i in range(n)]


# -- events --------------------------------------------------------------------------------------


def test_created_modified_unchanged_deleted(arc):
    before = now_us()
    first = arc.record("news/a.txt", b"first\n")
    after = now_us()
    assert first.status == "created"
    ev = first.event
    assert (ev.seq, ev.type, ev.key) == (1, "created", "news/a.txt")
    assert ev.sha256 == sha(b"first\n") and ev.size == 6
    # recorded_at is set by the archive; effective_at defaults to the time of observation
    assert before <= ev.recorded_at <= after
    assert before <= ev.effective_at <= after

    same = arc.record("news/a.txt", b"first\n")
    assert same.status == "unchanged"
    assert len(arc.history("news/a.txt")) == 1

    second = arc.record("news/a.txt", b"second\n")
    assert second.status == "modified"
    assert (second.event.seq, second.event.type) == (2, "modified")

    gone = arc.delete("news/a.txt")
    assert gone.status == "deleted"
    assert (gone.event.seq, gone.event.type) == (3, "deleted")

    events = arc.history("news/a.txt")
    assert [e.seq for e in events] == [1, 2, 3]
    assert [e.type for e in events] == ["created", "modified", "deleted"]
    assert all(len(e.event_hash) == 32 for e in events)
    with pytest.raises(NotFound):
        arc.show("news/a.txt")


def test_deleted_event_carries_no_hash_and_size_zero(arc):
    arc.record("a.txt", b"some content", at="2020-01-02T10:00:00Z")
    arc.delete("a.txt", at="2020-01-02T11:00:00Z")
    deleted = arc.history("a.txt")[-1]
    assert deleted.type == "deleted"
    assert deleted.sha256 is None
    assert deleted.size == 0
    logged = [e for e in arc.log() if e.type == "deleted"]
    assert len(logged) == 1 and logged[0].sha256 is None and logged[0].size == 0
    # and it still exists before its deletion
    assert arc.show("a.txt", at="2020-01-02T10:59:59Z").data == b"some content"


def test_unchanged_is_judged_against_the_version_in_effect_at_its_time(arc):
    arc.record("d.txt", b"A", at="2020-01-02T10:00:00Z")
    arc.record("d.txt", b"B", at="2020-01-02T12:00:00Z")
    # at 11:00 the version in effect is A: recording A there changes nothing
    assert arc.record("d.txt", b"A", at="2020-01-02T11:00:00Z").status == "unchanged"
    # B is not what was in effect at 11:00, so it is a new (back-filled) event
    assert arc.record("d.txt", b"B", at="2020-01-02T11:00:00Z").status == "modified"
    # at 13:00 B is in effect
    assert arc.record("d.txt", b"B", at="2020-01-02T13:00:00Z").status == "unchanged"
    assert [e.seq for e in arc.history("d.txt")] == [1, 2, 3]


def test_revert_is_a_new_event_pointing_at_existing_content(arc, db_url):
    a, b = seed("004"), seed("004") + b"\nA correction.\n"
    arc.record("r.txt", a, at="2020-01-02T10:00:00Z")
    arc.record("r.txt", b, at="2020-01-02T11:00:00Z")
    third = arc.record("r.txt", a, at="2020-01-02T12:00:00Z")
    assert third.status == "modified"
    events = arc.history("r.txt")
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[2].sha256 == events[0].sha256 == sha(a)
    # content is stored once per SHA-256: the revert added no content
    assert arc.stats()["contents"] == 2
    assert len(content_rows(db_url)) == 2
    rows = arc.changes("r.txt")
    assert rows[2]["reverts_to"] == 1
    assert rows[1]["reverts_to"] is None
    assert reader(db_url).show("r.txt", version=3).data == a


def test_content_is_stored_once_across_documents(arc, db_url):
    text = seed("003")
    arc.record("one.txt", text)
    arc.record("two/copy.txt", text)
    arc.record("three.txt", text + b"!")
    assert arc.stats()["contents"] == 2
    hashes = [r["sha256"] for r in content_rows(db_url).values()]
    assert sorted(hashes) == sorted({sha(text), sha(text + b"!")})


def test_sequence_numbers_gapless_and_positions_in_global_order(arc):
    keys = ["a.txt", "b/b.txt", "c.txt"]
    expected_order = []
    for i in range(4):
        for key in keys:
            r = arc.record(key, f"{key} version {i}\n".encode())
            expected_order.append((key, r.event.seq))
            # unchanged observations append nothing
            assert arc.record(key, f"{key} version {i}\n".encode()).status == "unchanged"
    gone = arc.delete("c.txt")
    expected_order.append(("c.txt", gone.event.seq))
    many = arc.record_many(
        [Version("a.txt", b"batch a"), Version("b/b.txt", b"batch b"), Version("a.txt", b"x")]
    )
    expected_order += [(r.key, r.event.seq) for r in many]
    for key in keys:
        seqs = [e.seq for e in arc.history(key)]
        assert seqs == list(range(1, len(seqs) + 1))
    log = arc.log()
    positions = [e.position for e in log]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert [(e.key, e.seq) for e in log] == expected_order


def test_event_hash_chain(arc, db_url):
    from archive.events import GENESIS, hash_event

    arc.record("h.txt", b"one", at="2020-01-02T10:00:00Z")
    arc.record("h.txt", b"two", at="2020-01-02T11:00:00Z")
    arc.record("other.txt", b"one", at="2020-01-02T11:30:00Z")
    arc.delete("h.txt", at="2020-01-02T12:00:00Z")
    arc.record("h.txt", b"three", at="2020-01-02T13:00:00Z")
    for key in ("h.txt", "other.txt"):
        previous = GENESIS
        for ev in arc.history(key):
            fields = dict(
                position=ev.position, doc_id=ev.doc_id, seq=ev.seq, type=ev.type, key=ev.key,
                sha256=ev.sha256, size=ev.size, recorded_at=ev.recorded_at,
                effective_at=ev.effective_at, meta=ev.meta,
            )
            # each hash covers the previous event's hash and this event's fields
            assert ev.event_hash == hash_event(previous, **fields)
            # the content hash is part of what is covered
            if ev.sha256 is not None:
                assert ev.event_hash != hash_event(previous, **{**fields, "sha256": sha(b"?")})
            previous = ev.event_hash
    hashes = [e.event_hash for e in arc.log()]
    assert len(set(hashes)) == len(hashes)
    assert arc.verify() == []


def test_verify_detects_a_changed_event_field_and_the_broken_chain(arc, db_url):
    arc.record("v.txt", b"one", at="2020-01-02T10:00:00Z")
    arc.record("v.txt", b"two", at="2020-01-02T11:00:00Z")
    arc.record("v.txt", b"three", at="2020-01-02T12:00:00Z")
    arc.record("fine.txt", b"untouched", at="2020-01-02T12:00:00Z")
    second = arc.history("v.txt")[1]
    assert arc.verify() == []
    # move version 2 an hour later behind the archive's back
    raw_sql(
        db_url,
        f"UPDATE events SET effective_at = effective_at + 3600000000 "
        f"WHERE position = {second.position}",
        bypass=("events",),
    )
    problems = reader(db_url).verify()
    assert problems
    text = json.dumps(problems, default=str)
    assert "v.txt" in text
    assert "fine.txt" not in text


def test_verify_detects_an_event_pointing_at_other_content(arc, db_url):
    arc.record("p.txt", b"AAAA", at="2020-01-02T10:00:00Z")
    arc.record("q.txt", b"BBBB", at="2020-01-02T10:00:00Z")
    p, q = arc.history("p.txt")[0], arc.history("q.txt")[0]
    raw_sql(
        db_url,
        f"UPDATE events SET content_id = {q.content_id} WHERE position = {p.position}",
        bypass=("events",),
    )
    problems = reader(db_url).verify()
    assert problems
    assert "p.txt" in json.dumps(problems, default=str)


# -- time ----------------------------------------------------------------------------------------


def test_at_is_inclusive_and_before_the_first_version_nothing_exists(arc):
    arc.record("t.txt", b"v1", at="2020-01-02T10:00:00Z")
    arc.record("t.txt", b"v2", at="2020-01-02T11:00:00Z")
    assert arc.show("t.txt", at="2020-01-02T11:00:00Z").data == b"v2"
    assert arc.show("t.txt", at=us("2020-01-02T11:00:00Z") - 1).data == b"v1"
    assert arc.show("t.txt", at="2020-01-02T10:00:00Z").data == b"v1"
    with pytest.raises(NotFound):
        arc.show("t.txt", at=us("2020-01-02T10:00:00Z") - 1)
    with pytest.raises(NotFound):
        arc.show("nope.txt")
    assert arc.show("t.txt").data == b"v2"
    assert arc.show("t.txt", version=1).data == b"v1"
    with pytest.raises(NotFound):
        arc.show("t.txt", version=3)


def test_backfilled_versions_are_honoured_by_replay(arc, db_url):
    arc.record("b.txt", b"ten o'clock", at="2020-01-02T10:00:00Z")
    arc.record("b.txt", b"noon", at="2020-01-02T12:00:00Z")
    # back-filled later, effective in between: storage order differs from time order
    r = arc.record("b.txt", b"eleven o'clock", at="2020-01-02T11:00:00Z")
    assert r.status == "modified" and r.event.seq == 3
    # and one older than everything
    arc.record("b.txt", b"nine o'clock", at="2020-01-02T09:00:00Z")
    fresh = reader(db_url)
    expect = {
        "2020-01-02T08:59:59Z": None,
        "2020-01-02T09:00:00Z": b"nine o'clock",
        "2020-01-02T09:59:59Z": b"nine o'clock",
        "2020-01-02T10:30:00Z": b"ten o'clock",
        "2020-01-02T11:00:00Z": b"eleven o'clock",
        "2020-01-02T11:59:59.999999Z": b"eleven o'clock",
        "2020-01-02T12:00:00Z": b"noon",
        "2030-01-01T00:00:00Z": b"noon",
    }
    for when, data in expect.items():
        if data is None:
            with pytest.raises(NotFound):
                fresh.show("b.txt", at=when)
        else:
            assert fresh.show("b.txt", at=when).data == data, when
    assert fresh.show("b.txt").data == b"noon"
    history = fresh.history("b.txt")
    assert [e.seq for e in history] == [1, 2, 3, 4]
    assert [e.effective_at for e in history] == [
        us("2020-01-02T10:00:00Z"), us("2020-01-02T12:00:00Z"),
        us("2020-01-02T11:00:00Z"), us("2020-01-02T09:00:00Z"),
    ]
    position, found = fresh.corpus(at="2020-01-02T11:30:00Z")
    assert [(e.key, e.seq) for e in found] == [("b.txt", 3)]
    assert position == 4


def test_backfilled_deletion_is_honoured(arc):
    arc.record("x.txt", b"one", at="2020-01-02T10:00:00Z")
    arc.record("x.txt", b"two", at="2020-01-02T14:00:00Z")
    arc.delete("x.txt", at="2020-01-02T12:00:00Z")
    with pytest.raises(NotFound):
        arc.show("x.txt", at="2020-01-02T13:00:00Z")
    assert arc.show("x.txt", at="2020-01-02T11:00:00Z").data == b"one"
    assert arc.show("x.txt", at="2020-01-02T14:00:00Z").data == b"two"
    assert [e.key for e in arc.corpus(at="2020-01-02T13:00:00Z")[1]] == []


def test_ties_in_effective_time_are_broken_by_sequence_number(arc):
    t = "2020-01-02T10:00:00Z"
    arc.record("tie.txt", b"first", at=t)
    assert arc.record("tie.txt", b"second", at=t).status == "modified"
    assert arc.show("tie.txt", at=t).data == b"second"
    arc.record("tie.txt", b"later", at="2020-01-02T11:00:00Z")
    # back-filled with the same effective time: the higher sequence number wins
    assert arc.record("tie.txt", b"third", at=t).event.seq == 4
    assert arc.show("tie.txt", at=t).data == b"third"
    assert arc.show("tie.txt", at="2020-01-02T11:00:00Z").data == b"later"
    _, found = arc.corpus(at=t)
    assert [(e.key, e.seq) for e in found] == [("tie.txt", 4)]


def test_known_at_limits_to_what_was_recorded(arc, db_url):
    arc.record("k.txt", b"known early", at="2020-01-02T12:00:00Z")
    arc.record("other.txt", b"other", at="2020-01-02T12:00:00Z")
    time.sleep(0.01)
    mark = datetime.now(UTC)
    time.sleep(0.01)
    # learned later: a back-filled version and a later one
    arc.record("k.txt", b"back-filled", at="2020-01-02T11:00:00Z")
    arc.record("k.txt", b"newest", at="2020-01-02T13:00:00Z")
    arc.record("late.txt", b"unknown then", at="2020-01-02T09:00:00Z")
    fresh = reader(db_url)
    assert fresh.show("k.txt", known_at=mark).data == b"known early"
    assert fresh.show("k.txt").data == b"newest"
    assert fresh.show("k.txt", at="2020-01-02T11:30:00Z").data == b"back-filled"
    with pytest.raises(NotFound):
        fresh.show("k.txt", at="2020-01-02T11:30:00Z", known_at=mark)
    with pytest.raises(NotFound):
        fresh.show("late.txt", at="2020-01-02T09:30:00Z", known_at=mark)
    assert [e.seq for e in fresh.history("k.txt", known_at=mark)] == [1]
    position, found = fresh.corpus(at="2030-01-01T00:00:00Z", known_at=mark)
    assert sorted(e.key for e in found) == ["k.txt", "other.txt"]
    assert position == 2
    assert all(e.recorded_at <= us(mark.isoformat()) for e in fresh.log(known_at=mark))
    assert len(fresh.log(known_at=mark)) == 2


def test_times_in_every_accepted_form(arc):
    arc.record("z.txt", b"v", at="2020-01-03T08:30:00Z")
    arc.record("o.txt", b"v", at="2020-01-03T00:30:00-08:00")
    arc.record("d.txt", b"v", at=datetime(2020, 1, 3, 8, 30, tzinfo=UTC))
    for key in ("z.txt", "o.txt", "d.txt"):
        assert arc.history(key)[0].effective_at == us("2020-01-03T08:30:00Z")
    with pytest.raises(BadInput):
        arc.show("z.txt", at="yesterday-ish")


# -- content: deltas, keyframes, exact replay ---------------------------------------------------


def test_keyframe_at_least_every_k_deltas(db_url):
    k = 3
    versions = growing_versions(13)
    with Archive(db_url, keyframe_interval=k) as arc:
        for i, data in enumerate(versions):
            arc.record("thread.txt", data, at=us("2020-01-02T10:00:00Z") + i * 60_000_000)
        events = arc.history("thread.txt")
    rows = content_rows(db_url)
    lengths = [chain_length(rows, e.content_id) for e in events]
    assert max(lengths) <= k
    deltas = sum(1 for e in events if rows[e.content_id]["base_id"] is not None)
    # growing text is stored as deltas, except the required keyframes
    assert deltas >= len(versions) // 2, lengths
    assert max(lengths) == k, lengths
    for e, data in zip(events, versions, strict=True):
        row = rows[e.content_id]
        assert row["sha256"] == sha(data) and row["size"] == len(data)
        if row["base_id"] is not None:
            # a delta is only kept when it is smaller than the full copy
            assert len(row["data"]) < full_copy_size(data)
    with reader(db_url, keyframe_interval=k) as fresh:
        for n, data in enumerate(versions, start=1):
            assert fresh.show("thread.txt", version=n).data == data


def test_default_keyframe_interval_bounds_chains(arc, db_url):
    versions = growing_versions(60)
    arc.record_many(
        Version("long.txt", data, us("2020-01-02T10:00:00Z") + i) for i, data in enumerate(versions)
    )
    rows = content_rows(db_url)
    lengths = [chain_length(rows, e.content_id) for e in arc.history("long.txt")]
    assert 0 < max(lengths) <= arc.keyframe_interval
    assert arc.keyframe_interval >= 1
    assert reader(db_url).show("long.txt", version=60).data == versions[-1]


def test_large_contents_are_stored_whole_and_replay_exactly(db_url, monkeypatch):
    """Above content.DELTA_UP_TO a version is a keyframe (bounded memory and time, decided
    by size alone); smaller neighbours still get deltas. The limit is lowered for the test."""
    import archive.content

    monkeypatch.setattr(archive.content, "DELTA_UP_TO", 20_000)
    big = seed("002") * 3  # > 20,000 bytes of Persian, emoji and English
    assert len(big) > 20_000
    small = seed_lines("000", 30)
    assert len(small) < 20_000
    versions = [
        ("big.txt", big),
        ("big.txt", big.replace(b"Iran", b"IRAN", 5)),
        ("big.txt", big.replace(b"Iran", b"IRAN", 5) + b"\nUpdate: appended\n"),
        ("small.txt", small),
        ("small.txt", small.replace(b"Soleimani", b"Suleimani", 1)),
    ]
    with Archive(db_url) as arc:
        for i, (key, data) in enumerate(versions):
            arc.record(key, data, at=us("2020-01-02T10:00:00Z") + i * 1_000_000)
        big_events, small_events = arc.history("big.txt"), arc.history("small.txt")
    rows = content_rows(db_url)
    assert [rows[e.content_id]["base_id"] for e in big_events] == [None, None, None]
    assert rows[small_events[1].content_id]["base_id"] == small_events[0].content_id
    fresh = reader(db_url)
    for n, (_key, data) in enumerate(versions[:3], start=1):
        assert fresh.show("big.txt", version=n).data == data
    assert fresh.show("small.txt", version=2).data == versions[4][1]


def test_keyframe_whenever_a_delta_would_not_be_smaller(db_url):
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz \n"
    unrelated = [
        "".join(rng.choice(letters) for _ in range(3000)).encode() for _ in range(3)
    ]
    base = seed("000")
    with Archive(db_url, keyframe_interval=10) as arc:
        arc.record("u.txt", unrelated[0], at="2020-01-02T10:00:00Z")
        arc.record("u.txt", unrelated[1], at="2020-01-02T11:00:00Z")
        arc.record("u.txt", unrelated[2], at="2020-01-02T12:00:00Z")
        arc.record("s.txt", base, at="2020-01-02T10:00:00Z")
        arc.record("s.txt", base.replace(b"Soleimani", b"Suleimani", 1), at="2020-01-02T11:00:00Z")
        u_events, s_events = arc.history("u.txt"), arc.history("s.txt")
    rows = content_rows(db_url)
    # an unrelated rewrite: a delta would not be smaller than the full copy
    for e in u_events:
        assert rows[e.content_id]["base_id"] is None
    # a one-word edit of an article: a delta, much smaller than the article
    edited = rows[s_events[1].content_id]
    assert edited["base_id"] == s_events[0].content_id
    assert len(edited["data"]) < full_copy_size(base) // 10


def _count_chain_queries(monkeypatch) -> list[int]:
    """A list that grows by one at each chain query the archive makes (a WITH RECURSIVE)."""
    from archive.store import Cursor

    chains: list[int] = []
    execute = Cursor.execute

    def counting(self, sql, params=None):
        if "WITH RECURSIVE" in sql:
            chains.append(1)
        return execute(self, sql, params)

    monkeypatch.setattr(Cursor, "execute", counting)
    return chains


def test_a_batch_past_its_prefetch_room_reads_no_chain_per_version(db_url, monkeypatch):
    """A batch's versions beyond what its prefetch may rebuild (a quarter of the cache) get
    their stored rows read in bulk: each is then rebuilt from the version before it without
    a chain query of its own, and every answer is still the exact bytes."""

    versions = growing_versions(40)
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        for i, data in enumerate(versions):
            arc.record("g.txt", data, at=t0 + i * 1_000_000)
    chains = _count_chain_queries(monkeypatch)
    total = sum(map(len, versions))
    with Archive(db_url, cache_bytes=total) as fresh, fresh.reader() as batch:
        events = [batch.resolve("g.txt", t0 + i * 1_000_000) for i in range(40)]
        batch.prefetch(events)  # rebuilds what fits in a quarter of the cache
        rebuilt = sum(fresh.cache.checked(ev.content_id) for ev in events)
        before = len(chains)
        got = [batch.snapshot(ev).data for ev in events]
    assert got == versions
    assert 2 <= rebuilt <= 30  # the room was used, and did not hold them all
    assert len(chains) - before <= 2  # not one per version past the room


def test_show_batch_rebuilds_past_the_prefetch_room_in_rounds(db_url, monkeypatch):
    """`show --batch` over more versions than one prefetch may hold rebuilds them in rounds
    that fit, each in bulk: a handful of chain queries in all, not one per version past the
    first round, and every answer is the exact bytes, in input order."""
    import io

    from archive import batch

    versions = growing_versions(60)
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        for i, data in enumerate(versions):
            arc.record("g.txt", data, at=t0 + i * 1_000_000)
    order = list(range(0, 60, 2))  # the versions between are not asked for
    random.Random(4).shuffle(order)
    lines = b"".join(
        f"g.txt\t{datetime.fromtimestamp((t0 + i * 1_000_000) / 1e6, UTC).isoformat()}\n".encode()
        for i in order
    )
    chains = _count_chain_queries(monkeypatch)
    total = sum(map(len, versions))
    sink = io.BytesIO()
    with Archive(db_url, cache_bytes=total) as fresh:
        assert batch.serve(fresh, io.BytesIO(lines), sink, known_at=None) == 30
    # A quarter of the cache holds fewer than 40 of the 60 (rounds of them).
    assert len([n for n in itertools.accumulate(map(len, versions)) if n > total // 4]) > 20
    assert len(chains) <= 4  # one per round (3 here); one per version past the room was 10
    out, expected = sink.getvalue(), []
    for i in order:
        data = versions[i]
        expected += [f"{sha(data).hex()} {len(data)} g.txt\n".encode(), data, b"\n"]
    assert out == b"".join(expected)
    # A round whose bulk rebuild fails leaves each of its answers to its own read, which
    # reports an error where there is one, in its turn: here there is none.
    from archive import StorageError
    from archive.api import Reader

    prefetch, calls = Reader.prefetch, []

    def failing(self, events):
        calls.append(1)
        if len(calls) == 2:
            raise StorageError("the database went away for a moment")
        return prefetch(self, events)

    monkeypatch.setattr(Reader, "prefetch", failing)
    sink = io.BytesIO()
    with Archive(db_url, cache_bytes=total) as fresh:
        assert batch.serve(fresh, io.BytesIO(lines), sink, known_at=None) == 30
    assert len(calls) >= 3 and sink.getvalue() == out


def test_replay_applies_at_most_k_deltas(db_url, monkeypatch):
    import archive.delta

    k = 4
    versions = growing_versions(15)
    with Archive(db_url, keyframe_interval=k) as arc:
        for i, data in enumerate(versions):
            arc.record("g.txt", data, at=us("2020-01-02T10:00:00Z") + i * 1_000_000)
    applied = []
    # count every delta the replay applies, whichever entry point of archive.delta it uses
    if hasattr(archive.delta, "apply"):
        one = archive.delta.apply

        def counting_apply(old, step, *rest, **kw):
            applied.append(1)
            return one(old, step, *rest, **kw)

        monkeypatch.setattr(archive.delta, "apply", counting_apply)
    if hasattr(archive.delta, "apply_chain"):
        many = archive.delta.apply_chain

        def counting_chain(base, steps, *rest, **kw):
            steps = list(steps)
            applied.extend(1 for _ in steps)
            return many(base, steps, *rest, **kw)

        monkeypatch.setattr(archive.delta, "apply_chain", counting_chain)
    if hasattr(archive.delta, "apply_stored"):  # may call apply_chain: then counted twice
        stored = archive.delta.apply_stored

        def counting_stored(base, step, *rest, **kw):
            applied.append(1)
            return stored(base, step, *rest, **kw)

        monkeypatch.setattr(archive.delta, "apply_stored", counting_stored)
    most = 0
    for n, data in enumerate(versions, start=1):
        with reader(db_url, keyframe_interval=k) as fresh:
            applied.clear()
            assert fresh.show("g.txt", version=n).data == data
            assert len(applied) <= k, (n, len(applied))
            most = max(most, len(applied))
    assert most > 0  # replay did go through deltas


def _two_keyframes(arc):
    """Two documents whose single versions are keyframes of the same size."""
    arc.record("victim.txt", b"A" * 40, at="2020-01-02T10:00:00Z")
    arc.record("donor.txt", b"B" * 40, at="2020-01-02T10:00:00Z")
    return arc.history("victim.txt")[0], arc.history("donor.txt")[0]


def test_keyframes_are_zstd_small_payloads_zlib_or_raw_and_all_replay(db_url):
    """Each stored blob's codec follows from its payload's size (zstd above ZSTD_FROM, zlib
    above ZLIB_FROM where it shrinks, raw up to ZLIB_FROM or where nothing shrinks it), and
    a zstd frame with a flipped byte is reported as damage, never returned."""
    from archive import content

    text = seed("002")
    assert len(text) > content.ZSTD_FROM
    with Archive(db_url) as arc:
        arc.record("big.txt", text, at="2020-01-02T10:00:00Z")
        arc.record("big.txt", text + b"\nUpdate: more.\n", at="2020-01-02T11:00:00Z")
        arc.record("small.txt", b"x" * 300, at="2020-01-02T10:00:00Z")
        arc.record("tiny.txt", b"ab", at="2020-01-02T10:00:00Z")
        # deltas of one insertion each: payloads of about 215 and 415 bytes that zlib shrinks
        arc.record("d.txt", b"a" * 1000, at="2020-01-02T10:00:00Z")
        arc.record("d.txt", b"a" * 1000 + b"y" * 200, at="2020-01-02T11:00:00Z")
        arc.record("d.txt", b"a" * 1000 + b"y" * 200 + b"z" * 400, at="2020-01-02T12:00:00Z")
    codecs = dict(raw_rows(db_url, "SELECT size, codec FROM contents"))
    assert codecs[len(text)] == content.ZSTD  # a keyframe
    assert codecs[len(text) + 15] == content.RAW  # a small delta
    assert codecs[1200] == content.RAW  # up to ZLIB_FROM bytes: raw, though zlib shrinks it
    assert codecs[1600] == content.ZLIB
    assert codecs[300] == content.ZLIB
    assert codecs[2] == content.RAW
    with reader(db_url) as fresh:
        assert fresh.show("big.txt", at="2020-01-02T10:30:00Z").data == text
        assert fresh.show("big.txt").data == text + b"\nUpdate: more.\n"
    [(keyframe_id, blob)] = raw_rows(
        db_url, f"SELECT id, data FROM contents WHERE codec = {content.ZSTD}"
    )
    _flip_a_byte(db_url, keyframe_id, blob)
    with reader(db_url) as fresh:
        with pytest.raises(Damaged):
            fresh.show("big.txt")
        assert "big.txt" in json.dumps(fresh.verify(), default=str)
    forged = bytearray(blob)
    forged[4:14] = b"\xff" * 10  # a frame header declaring an absurd size
    with pytest.raises(ValueError):
        content.unpack(content.ZSTD, bytes(forged))
    with pytest.raises(ValueError):
        content.unpack(content.ZSTD, blob[: len(blob) // 2])  # a cut frame
    # Each thread reuses its own zstd contexts: a failed frame leaves nothing behind, and
    # threads packing and unpacking at once get their own bytes back.
    assert content.unpack(content.ZSTD, blob) == content.unpack(*content.pack(text))
    payloads = [text[i:] + text[:i] for i in range(0, 8000, 1000)]

    def round_trip(payload: bytes) -> bool:
        return all(content.unpack(*content.pack(payload)) == payload for _ in range(20))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(round_trip, payloads))


def _blob_literal(db_url: str, data: bytes) -> str:
    return f"X'{data.hex()}'" if dialect(db_url) == "sqlite" else f"'\\x{data.hex()}'::bytea"


def _flip_a_byte(db_url: str, content_id: int, blob: bytes) -> None:
    """Damage: one byte in the middle of a stored blob flipped."""
    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 0xFF
    raw_sql(
        db_url,
        f"UPDATE contents SET data = {_blob_literal(db_url, bytes(flipped))}"
        f" WHERE id = {content_id}",
        bypass=("contents",),
    )


def test_replay_fails_loudly_on_tampered_keyframe(arc, db_url):
    victim, donor = _two_keyframes(arc)
    copy_stored_blob(db_url, into=victim.content_id, source=donor.content_id)
    with reader(db_url) as fresh:
        with pytest.raises(Damaged):
            fresh.show("victim.txt")
        with pytest.raises(Damaged):
            fresh.show("victim.txt", at="2020-01-02T10:00:00Z")
        assert fresh.show("donor.txt").data == b"B" * 40
        problems = fresh.verify()
    assert problems
    # verify names the broken document
    assert "victim.txt" in json.dumps(problems, default=str)


def test_replay_fails_loudly_on_a_tampered_delta_base(db_url, tmp_path):
    versions = growing_versions(4)
    with Archive(db_url, keyframe_interval=10) as arc:
        for i, data in enumerate(versions):
            arc.record("chain.txt", data, at=us("2020-01-02T10:00:00Z") + i)
        arc.record("other.txt", b"x" * len(versions[0]), at="2020-01-02T10:00:00Z")
        events = arc.history("chain.txt")
        other = arc.history("other.txt")[0]
    rows = content_rows(db_url)
    assert rows[events[-1].content_id]["base_id"] is not None
    # the keyframe at the bottom of the chain now holds other bytes of the same length
    copy_stored_blob(db_url, into=events[0].content_id, source=other.content_id)
    with reader(db_url) as fresh:
        for n in range(1, len(versions) + 1):
            with pytest.raises(Damaged):
                fresh.show("chain.txt", version=n)
        exports = tmp_path / "exports"
        exports.mkdir()
        with pytest.raises(Damaged):
            fresh.export(at="2020-01-03T00:00:00Z", out=str(exports / "snap"))
        # a failed export leaves no partial target and no temporary files behind
        assert list(exports.iterdir()) == []
        problems = fresh.verify()
    assert problems
    assert "chain.txt" in json.dumps(problems, default=str)


def test_bases_read_in_bulk_store_the_same_deltas(tmp_path):
    """A batch whose bases have left the cache reads them in bulk (one chain query per 500
    documents): it stores exactly the rows a batch with every base cached stores, and each
    version replays exactly."""
    texts = [seed(name) for name in ("000", "001", "002", "003", "004")]
    versions: list[list[Version]] = [[], [], []]
    expected = {}
    for i in range(600):
        lines = texts[i % 5].splitlines(keepends=True)
        first = b"".join(lines[i % 7 : i % 7 + 12]) + b"doc %d\n" % i
        second = first + lines[(i + 13) % len(lines)]
        third = second.replace(b" the ", b" a ", 1) if i % 3 else b"\xff binary now %d" % i
        for n, data in enumerate((first, second, third)):
            versions[n].append(Version(f"bulk/{i}.txt", data, 1_600_000_000_000_000 + n))
        expected[f"bulk/{i}.txt"] = (first, second, third)
    stores = {}
    for name, cache_bytes in (("warm", 64 << 20), ("cold", 0)):
        url = f"sqlite:///{tmp_path / name}.db"
        with Archive(url, cache_bytes=cache_bytes) as arc:
            arc.init()
            for batch in versions:
                arc.record_many(batch)
        stores[name] = sorted(
            (r["sha256"], r["size"], r["base_id"], r["data"]) for r in content_rows(url).values()
        )
    assert stores["warm"] == stores["cold"]
    assert sum(1 for row in stores["cold"] if row[2] is not None) >= 1000  # deltas, mostly
    with reader(f"sqlite:///{tmp_path / 'cold'}.db") as fresh:
        for key, datas in expected.items():
            for n, data in enumerate(datas, start=1):
                assert fresh.show(key, version=n).data == data


def test_binary_and_non_utf8_content_byte_exact(arc, db_url):
    rng = random.Random(3)
    blobs = [
        bytes(range(256)) * 4,
        b"\x00" * 100,
        "café latin-1\n".encode("latin-1"),
        "\ufeffutf-16 text\r\n".encode("utf-16"),
        b"\xe2\x82",  # truncated UTF-8
        b"valid start \xff\xfe then invalid",
        bytes(rng.getrandbits(8) for _ in range(5000)),
        b"\x89PNG\r\n\x1a\n" + bytes(rng.getrandbits(8) for _ in range(300)),
        b"\xff" + b"compressible but not UTF-8 " * 800,
    ]
    for i, blob in enumerate(blobs):
        arc.record(f"bin/{i}.bin", blob, at="2020-01-02T10:00:00Z")
        # the same document switching between text and binary
        t = us("2020-01-02T10:00:00Z") + 2 * i
        arc.record("mixed.dat", b"plain text version %d\n" % i, at=t)
        arc.record("mixed.dat", blob, at=t + 1)
    rows = content_rows(db_url)
    compressible = blobs[-1]
    stored = [r for r in rows.values() if r["sha256"] == sha(compressible)]
    assert len(stored[0]["data"]) < len(compressible) // 10
    with reader(db_url) as fresh:
        for i, blob in enumerate(blobs):
            snap = fresh.show(f"bin/{i}.bin")
            assert snap.data == blob
            assert snap.event.sha256 == sha(blob) and snap.event.size == len(blob)
            # non-UTF-8 content is stored as a full copy, compressed
            stored = rows[snap.event.content_id]
            assert stored["base_id"] is None
            assert len(stored["data"]) <= max(len(blob), 64)
            assert fresh.show("mixed.dat", version=2 * i + 2).data == blob
            assert fresh.show("mixed.dat", version=2 * i + 1).data == b"plain text version %d\n" % i
            assert fresh.show("mixed.dat", at=us("2020-01-02T10:00:00Z") + 2 * i + 1).data == blob


TEXT_FORMS = [
    "plain line\n",
    "\ufeffwith a BOM\n",
    "with a BOM\n",
    "CRLF line one\r\nCRLF line two\r\n",
    "CRLF line one\r\nCRLF line two",  # no trailing newline
    "mixed\r\nendings\nand\ra lone CR",
    unicodedata.normalize("NFC", "café résumé naïve\n"),
    unicodedata.normalize("NFD", "café résumé naïve\n"),
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇮🇷 astral 𝄞\n",
    "سلام دنیا، این یک متن فارسی است.\u200cمی‌خواهم\n",
    "NUL\x00inside text\x00\n",
    "",
    "\n",
    " trailing spaces   \n\n\n",
    "Ώ and 𝒜 and \u2028 line separator and \u0085 NEL\n",
]


def test_text_forms_come_back_byte_exact(arc, db_url):
    persian = seed("001")
    versions = [t.encode("utf-8") for t in TEXT_FORMS]
    # each form also as an edit of a real article, so that deltas carry it
    article = seed("000")
    versions += [article + v for v in versions] + [persian, persian.replace(b"\n", b"\r\n")]
    t0 = us("2020-01-02T10:00:00Z")
    for i, data in enumerate(versions):
        arc.record("forms.txt", data, at=t0 + i)
        arc.record(f"form/{i}.txt", data, at=t0)
    history = arc.history("forms.txt")
    assert len(history) == len(versions)  # consecutive forms all differ
    rows = content_rows(db_url)
    assert any(rows[e.content_id]["base_id"] is not None for e in history)  # deltas in play
    with reader(db_url) as fresh:
        for i, data in enumerate(versions):
            assert fresh.show("forms.txt", version=i + 1).data == data, i
            assert fresh.show("forms.txt", at=t0 + i).data == data, i
            assert fresh.show(f"form/{i}.txt").data == data, i
        assert fresh.verify() == []


def test_empty_content_is_a_version_not_a_deletion(arc):
    arc.record("e.txt", b"something", at="2020-01-02T10:00:00Z")
    r = arc.record("e.txt", b"", at="2020-01-02T11:00:00Z")
    assert r.status == "modified"
    assert r.event.sha256 == sha(b"") and r.event.size == 0
    assert arc.show("e.txt").data == b""
    assert [e.key for e in arc.corpus()[1]] == ["e.txt"]


def test_concurrent_writers_keep_sequence_numbers_gapless(db_url):
    import threading

    with Archive(db_url) as setup:
        setup.init()
    statuses: list[str] = []
    errors: list[BaseException] = []

    def worker(tag: str) -> None:
        try:
            with Archive(db_url) as mine:
                for i in range(8):
                    statuses.append(mine.record("shared.txt", f"{tag} {i}\n".encode()).status)
                    mine.record(f"{tag}.txt", f"{i}".encode())
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with reader(db_url) as fresh:
        seqs = [e.seq for e in fresh.history("shared.txt")]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) == sum(1 for s in statuses if s != "unchanged") == 24
        positions = [e.position for e in fresh.log()]
        assert len(positions) == len(set(positions)) == 48
        assert fresh.verify() == []


def test_sqlite_connections_are_durable_wal_with_rare_checkpoints(tmp_path):
    """Every SQLite connection of an archive: WAL, synchronous=FULL (a committed version
    survives power loss), foreign keys on, a checkpoint every 10,000 WAL pages and the WAL
    cut back to that size after one."""
    from archive.store import SQLITE_CHECKPOINT_PAGES

    with Archive(str(tmp_path / "a.db")) as arc:
        arc.record("a.txt", b"one")
        raw = arc.store.engine.raw_connection()
        try:
            cur = raw.cursor()
            got = {
                name: cur.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys",
                             "wal_autocheckpoint", "journal_size_limit")
            }
        finally:
            raw.close()
    assert got == {
        "journal_mode": "wal",
        "synchronous": 2,
        "foreign_keys": 1,
        "wal_autocheckpoint": SQLITE_CHECKPOINT_PAGES,
        "journal_size_limit": SQLITE_CHECKPOINT_PAGES * 4096,
    }


def test_a_write_by_another_archive_is_seen_by_the_next_batch(db_url):
    """Each Archive remembers the documents its last write left; another writer's commit in
    between (another process, another connection) makes that memory stale, and the next
    batch must read the documents again: sequence numbers, hash chain, bases and the version
    in effect all follow the database, never the memory."""
    texts = [seed_lines("001", n) for n in (3, 5, 8, 12, 16, 20)]
    with Archive(db_url) as one, Archive(db_url) as other:
        one.init()
        at = us("2020-01-03T00:00:00Z")
        for n, data in enumerate(texts):
            writer = (one, other)[n % 2]
            recorded = writer.record_many(
                [Version("a.txt", data, at + n), Version(f"only-{n % 2}.txt", data, at + n)]
            )
            assert recorded[0].status == ("created" if n == 0 else "modified")
            assert recorded[0].event.seq == n + 1
        # A document the other archive deleted is absent to this one's next write too.
        other.delete("only-0.txt", at=at + 10)
        assert one.record("only-0.txt", texts[0], at=at + 11).status == "created"
        assert one.record("a.txt", texts[-1], at=at + 12).status == "unchanged"
    with reader(db_url) as fresh:
        assert [e.seq for e in fresh.history("a.txt")] == list(range(1, len(texts) + 1))
        for n, data in enumerate(texts):
            assert fresh.show("a.txt", at=at + n).data == data
        assert [e.type for e in fresh.history("only-0.txt")][-2:] == ["deleted", "created"]
        assert fresh.verify() == []


def test_a_rename_is_seen_by_the_next_batch_of_the_same_archive(arc):
    """A rename is an event: the next batch's memory of documents is stale by its position,
    and the renamed document and the freed name are read again."""
    arc.record("a.txt", b"one\n", at="2020-01-03T00:00:00Z")
    arc.rename("a.txt", "b.txt", at="2020-01-03T01:00:00Z")
    moved = arc.record("b.txt", b"one\ntwo\n", at="2020-01-03T02:00:00Z")
    assert (moved.status, moved.event.seq) == ("modified", 3)
    again = arc.record("a.txt", b"new\n", at="2020-01-03T03:00:00Z")
    assert (again.status, again.event.seq) == ("created", 1)
    assert again.event.doc_id != moved.event.doc_id
    assert arc.verify() == []


def test_threads_sharing_one_archive_keep_its_memory_of_documents_exact(db_url):
    """One Archive written by several threads at once: each batch's memory of the documents
    is merged only into what was exact when it began."""
    with Archive(db_url) as shared:
        shared.init()

        def worker(tag: int) -> list[str]:
            out = []
            for i in range(12):
                batch = [Version("shared.txt", f"{tag} {i}\n".encode() * (i + 1))]
                batch.append(Version(f"own-{tag}.txt", f"{i}\n".encode() * (i + 1)))
                out += [r.status for r in shared.record_many(batch)]
            return out

        with ThreadPoolExecutor(3) as pool:
            statuses = [s for got in pool.map(worker, range(3)) for s in got]
        assert statuses.count("unchanged") == 0
        assert shared.record("shared.txt", b"last").event.seq == 37
    with reader(db_url) as fresh:
        assert [e.seq for e in fresh.history("shared.txt")] == list(range(1, 38))
        for tag in range(3):
            assert fresh.show(f"own-{tag}.txt").data == b"11\n" * 12
        assert fresh.verify() == []


def test_a_batch_that_failed_leaves_the_memory_of_documents_as_the_database_is(db_url):
    """A batch the database refuses (here a trigger of the test's own) rolls back; the next
    batch on the same Archive starts from the states before it, not from the failed one's."""
    with Archive(db_url) as arc:
        arc.record("a.txt", b"one\n", at="2020-01-03T00:00:00Z")
        if dialect(db_url) == "sqlite":
            raw_sql(
                db_url,
                "CREATE TRIGGER test_boom BEFORE INSERT ON events WHEN NEW.key = 'boom'"
                " BEGIN SELECT RAISE(ABORT, 'boom'); END",
            )
        else:
            raw_sql(
                db_url,
                "CREATE FUNCTION test_boom() RETURNS trigger AS $$ BEGIN"
                " IF NEW.key = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END"
                " $$ LANGUAGE plpgsql",
                "CREATE TRIGGER test_boom BEFORE INSERT ON events FOR EACH ROW"
                " EXECUTE FUNCTION test_boom()",
            )
        with pytest.raises(ArchiveError):
            arc.record_many(
                [Version("a.txt", b"one\ntwo\n", us("2020-01-03T01:00:00Z")),
                 Version("boom", b"x", us("2020-01-03T01:00:00Z"))]
            )
        again = arc.record("a.txt", b"one\ntwo\n", at="2020-01-03T01:00:00Z")
        assert (again.status, again.event.seq) == ("modified", 2)
        assert arc.record("b.txt", b"b").event.position == 3
    with reader(db_url) as fresh:
        assert [e.seq for e in fresh.history("a.txt")] == [1, 2]
        assert fresh.show("a.txt").data == b"one\ntwo\n"
        assert fresh.verify() == []


# -- rename -------------------------------------------------------------------------------------


def test_rename_keeps_history_and_old_name_resolves(arc, db_url):
    arc.record("old/name.txt", b"v1\n", at="2020-01-02T10:00:00Z")
    arc.record("old/name.txt", b"v1\nv2\n", at="2020-01-02T11:00:00Z")
    r = arc.rename("old/name.txt", "new/name.txt", at="2020-01-02T12:00:00Z")
    assert r.status == "renamed"
    assert (r.event.seq, r.event.type, r.event.key) == (3, "renamed", "new/name.txt")
    assert r.event.sha256 == sha(b"v1\nv2\n") and r.event.size == 6
    new = arc.history("new/name.txt")
    old = arc.history("old/name.txt")
    assert [e.seq for e in new] == [1, 2, 3]
    assert [e.type for e in new] == ["created", "modified", "renamed"]
    assert new == old
    assert arc.show("old/name.txt", version=1).data == b"v1\n"
    assert arc.show("new/name.txt").data == b"v1\nv2\n"
    arc.record("new/name.txt", b"v1\nv2\nv3\n", at="2020-01-02T13:00:00Z")
    assert [e.seq for e in arc.history("new/name.txt")] == [1, 2, 3, 4]
    assert [e.key for e in arc.corpus(at="2020-01-02T11:30:00Z")[1]] == ["old/name.txt"]
    assert [e.key for e in arc.corpus(at="2020-01-02T14:00:00Z")[1]] == ["new/name.txt"]
    assert reader(db_url).verify() == []


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../escape.txt", "/etc/passwd", "a/../../b", "a//b", ""])
def test_keys_that_could_escape_an_export_are_refused(arc, key):
    with pytest.raises(BadInput):
        arc.record(key, b"x")


# -- the seeds ----------------------------------------------------------------------------------


def _timeline() -> list[tuple[str, str, bytes]]:
    plan = json.loads((SEEDS / "timeline.json").read_text())
    steps = []
    for step in plan["steps"]:
        lines = (SEEDS / step["doc"]).read_bytes().splitlines(keepends=True)
        if "lines" in step:
            data = b"".join(b"".join(lines[a - 1 : b]) for a, b in step["lines"])
        else:
            data = (SEEDS / step["doc"]).read_bytes()
        steps.append((step["at"], step["doc"], data))
    return steps


def test_seed_timeline_replays_exactly(arc, db_url):
    steps = _timeline()
    for at, doc, data in steps:
        arc.record(doc, data, at=at)
    with reader(db_url) as fresh:
        seen = set()
        for at, doc, data in steps:
            assert fresh.show(doc, at=at).data == data
            if doc in seen:
                assert fresh.show(doc, at=us(at) - 1).data != data
            else:
                with pytest.raises(NotFound):
                    fresh.show(doc, at=us(at) - 1)
            seen.add(doc)
        article = "000_3ac9f82c1f93d425.txt"
        before = fresh.show(article, at="2020-01-03T00:29:59-08:00").data
        after = fresh.show(article, at="2020-01-03T00:30:00-08:00").data
        assert b"Update: 2020-01-03 12:30AM PT" not in before
        assert b"Update: 2020-01-03 12:30AM PT" in after
        assert after.startswith(before)
        assert after == seed("000")
        _, found = fresh.corpus(at="2020-01-03T00:00:00-08:00")
        assert sorted(e.key for e in found) == sorted(p.name for p in SEEDS.glob("0*.txt"))
        stats = fresh.stats()
        assert stats["events"] == len(steps)
        assert stats["raw_bytes"] == sum(len(d) for _, _, d in steps)
        assert stats["stored_bytes"] < stats["raw_bytes"]
        assert fresh.verify() == []


# -- immutability in the database itself ---------------------------------------------------------


def _expect_refused(db_url: str, statement: str) -> None:
    if dialect(db_url) == "sqlite":
        conn = sqlite3.connect(sqlite_path(db_url), isolation_level=None)
        try:
            with pytest.raises(sqlite3.DatabaseError):
                conn.execute(statement)
        finally:
            conn.close()
        return
    from sqlalchemy.exc import DBAPIError

    engine = create_engine(db_url)
    try:
        with pytest.raises(DBAPIError), engine.begin() as conn:
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def test_database_rejects_changes_to_history(arc, db_url):
    arc.record("i.txt", b"one", at="2020-01-02T10:00:00Z")
    arc.record("i.txt", b"two", at="2020-01-02T11:00:00Z")
    before_events = raw_rows(db_url, "SELECT * FROM events ORDER BY position")
    before_contents = raw_rows(db_url, "SELECT * FROM contents ORDER BY id")
    statements = [
        "UPDATE events SET size = size + 1",
        "UPDATE events SET effective_at = 0 WHERE position = 1",
        "DELETE FROM events",
        "DELETE FROM events WHERE position = 2",
        "UPDATE contents SET size = size + 1",
        "DELETE FROM contents",
    ]
    if dialect(db_url) == "sqlite":
        statements += [
            "INSERT OR REPLACE INTO events SELECT * FROM events WHERE position = 1",
            "REPLACE INTO events SELECT * FROM events",
            "INSERT OR REPLACE INTO contents SELECT * FROM contents",
        ]
    else:
        statements += ["TRUNCATE events", "TRUNCATE events, contents, documents, doc_names"]
    for statement in statements:
        _expect_refused(db_url, statement)
    assert raw_rows(db_url, "SELECT * FROM events ORDER BY position") == before_events
    assert raw_rows(db_url, "SELECT * FROM contents ORDER BY id") == before_contents
    assert reader(db_url).verify() == []


def test_triggers_exist_at_head(arc, db_url):
    arc.init()
    if dialect(db_url) == "sqlite":
        rows = raw_rows(
            db_url, "SELECT tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
        )
        on_events = " ".join(sql.upper() for table, sql in rows if table == "events")
        assert "UPDATE" in on_events and "DELETE" in on_events
    else:
        rows = raw_rows(
            db_url,
            "SELECT tgrelid::regclass::text, tgtype FROM pg_trigger WHERE NOT tgisinternal",
        )
        types = [t for table, t in rows if table == "events"]
        # tgtype bits: 8 DELETE, 16 UPDATE, 32 TRUNCATE
        assert any(t & 16 for t in types) and any(t & 8 for t in types)
        assert any(t & 32 for t in types)


# -- schema -------------------------------------------------------------------------------------


def test_revisions_match_the_alembic_scripts():
    from alembic.script import ScriptDirectory

    from archive.store import HEAD, REVISIONS

    scripts = ScriptDirectory(str(ROOT / "alembic"))
    chain = tuple(reversed([s.revision for s in scripts.walk_revisions()]))
    assert chain == REVISIONS
    assert scripts.get_heads() == [HEAD]
    assert REVISIONS[-1] == HEAD


def test_an_empty_database_is_upgraded_automatically(db_url):
    from archive.store import HEAD

    if dialect(db_url) == "sqlite":
        Path(sqlite_path(db_url)).write_bytes(b"")  # an existing, empty file
    with Archive(db_url) as arc:
        assert arc.record("x.txt", b"x").status == "created"
    assert raw_rows(db_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    with Archive(db_url) as arc:
        assert arc.init() == HEAD
        assert arc.show("x.txt").data == b"x"


def test_a_newer_schema_is_refused_clearly(arc, db_url):
    arc.record("x.txt", b"x")
    arc.close()
    raw_sql(db_url, "UPDATE alembic_version SET version_num = 'zz9999_future'")
    with Archive(db_url) as newer, pytest.raises(ArchiveError) as caught:
        newer.show("x.txt")
    message = str(caught.value)
    assert "zz9999_future" in message
    assert "newer" in message.lower()
    # nothing was changed by the refusal
    assert raw_rows(db_url, "SELECT version_num FROM alembic_version") == [("zz9999_future",)]


def test_rename_many_is_one_transaction_with_one_recorded_time(arc):
    for name in ("d/a.txt", "d/b.txt", "d/c.txt"):
        arc.record(name, name.encode())
    results = arc.rename_many([(f"d/{n}", f"e/{n}") for n in ("a.txt", "b.txt", "c.txt")])
    events = [r.event for r in results]
    assert [r.status for r in results] == ["renamed"] * 3
    assert len({ev.recorded_at for ev in events}) == 1
    positions = [ev.position for ev in events]
    assert positions == list(range(positions[0], positions[0] + 3))
    assert arc.show("d/b.txt").data == b"d/b.txt"  # the old name still resolves
    assert [ev.type for ev in arc.history("e/b.txt")] == ["created", "renamed"]
    assert arc.verify() == []


def test_a_cyclic_delta_chain_is_reported_not_followed_forever(db_url):
    """Damage that makes a chain loop (a keyframe turned into a delta on its own delta)
    ends in Damaged for every read and in verify, never in a hang."""
    versions = growing_versions(3)
    with Archive(db_url, keyframe_interval=10) as arc:
        for i, data in enumerate(versions):
            arc.record("loop.txt", data, at=us("2020-01-02T10:00:00Z") + i)
        events = arc.history("loop.txt")
    first, last = events[0].content_id, events[-1].content_id
    assert content_rows(db_url)[last]["base_id"] is not None
    raw_sql(
        db_url,
        f"UPDATE contents SET base_id = {last}, depth = 1 WHERE id = {first}",
        bypass=("contents",),
    )
    with reader(db_url) as fresh:
        for n in range(1, len(versions) + 1):
            with pytest.raises(Damaged):
                fresh.show("loop.txt", version=n)
        problems = fresh.verify()
    assert "loop.txt" in json.dumps(problems, default=str)


def test_damage_that_a_later_delta_hides_is_still_caught(db_url):
    """Replay keeps the contents it passes on the way up a chain, unchecked. A damaged delta
    whose damage the next delta deletes gives a correct later version, but the damaged
    version itself is never returned: it is checked when asked for, and verify names it."""
    base = seed("000")
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        for i, tail in enumerate([b"", b"INSERTED-PARAGRAPH", b"tail2"]):
            arc.record("victim.txt", base + tail, at=t0 + i)
        arc.record("donor.txt", base, at=t0)
        arc.record("donor.txt", base + b"XNSERTED-PARAGRAPH", at=t0 + 1)
        victim, donor = arc.history("victim.txt"), arc.history("donor.txt")
    rows = content_rows(db_url)
    assert donor[0].content_id == victim[0].content_id  # one content, stored once
    assert rows[victim[1].content_id]["base_id"] == victim[0].content_id
    assert rows[donor[1].content_id]["base_id"] == victim[0].content_id
    assert rows[victim[2].content_id]["base_id"] == victim[1].content_id
    # victim's v2 now holds the donor's delta: same operations, other inserted text
    copy_stored_blob(db_url, into=victim[1].content_id, source=donor[1].content_id)
    with Archive(db_url) as fresh:
        assert fresh.show("victim.txt", version=3).data == base + b"tail2"
        with pytest.raises(Damaged):
            fresh.show("victim.txt", version=2)
        with pytest.raises(Damaged):
            fresh.show("victim.txt", at=t0 + 1)
        assert fresh.show("victim.txt", version=3).data == base + b"tail2"
        problems = fresh.verify()
    assert any(p.get("document") == "victim.txt" and p.get("seq") == 2 for p in problems)


@pytest.mark.parametrize("change", ["error stub", "section cut"])
def test_a_page_back_after_a_large_change_is_a_small_delta_on_the_page_before(db_url, change):
    """A page that briefly became an error stub, or lost a section, and then came back
    (slightly edited) is stored as a small delta against the page before, not as a full copy
    or a delta inserting the section again. In the second case the page came back edited near
    both ends, so no earlier version shares a useful common prefix or suffix with it: the
    candidates are ranked by the lines each lacks."""
    page = seed("002")
    lines = page.splitlines(keepends=True)
    if change == "error stub":
        middle, back = b"503 Service Unavailable\n", page.replace(b"Iran", b"IRAN", 3)
    else:
        middle = b"".join(lines[:20] + lines[40:])
        back = b"".join(lines[:-1]).replace(b"Iran", b"IRAN", 1)  # its last line cut
        assert back[:200] != page[:200] and back[-20:] != page[-20:]
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        for i, data in enumerate([page, middle, back]):
            arc.record("p.txt", data, at=t0 + i)
        events = arc.history("p.txt")
    rows = content_rows(db_url)
    restored = rows[events[2].content_id]
    assert restored["base_id"] == events[0].content_id
    assert len(restored["data"]) < 200
    with reader(db_url) as fresh:
        assert fresh.show("p.txt", version=3).data == back
        assert fresh.verify() == []


def test_contents_a_replay_passes_only_fill_free_room_in_the_cache():
    """What reads asked for (checked) is never pushed out by contents a replay passed on
    its way (unchecked); those take free room, or each other's, and go first."""
    from archive.replay import ContentCache

    cache = ContentCache(budget=400)
    for n in range(4):
        cache.put(n, bytes(100))  # full, all checked
    cache.put(10, bytes(100), checked=False)
    assert not cache.holds(10) and all(cache.checked(n) for n in range(4))
    cache = ContentCache(budget=400)
    cache.put(0, bytes(100))
    for n in (10, 11, 12, 13):
        cache.put(n, bytes(100), checked=False)  # the last one replaces the oldest passed
    assert cache.checked(0) and cache.holds(13) and not cache.checked(13)
    assert not cache.holds(10) and cache.holds(11)
    assert cache.used <= cache.budget
    cache.put(1, bytes(100))  # a checked one makes room by evicting passed ones first
    assert cache.checked(0) and cache.checked(1) and cache.used <= cache.budget


def _codecs(db_url: str) -> dict[int, tuple[int | None, int, int]]:
    """id -> (base_id, depth, codec) of every stored content."""
    rows = raw_rows(db_url, "SELECT id, base_id, depth, codec FROM contents")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _paragraphs(data: bytes) -> list[bytes]:
    return data.split(b"\n\n")


def test_a_rewrite_that_moves_text_is_compressed_against_its_base(db_url):
    """diff-match-patch can only delete and insert: paragraphs moved about come out as
    inserted text. That payload is compressed with its base as zstd dictionary (codec 3),
    smaller than compressed alone, and replays exactly from storage; damage is reported."""
    from archive import content

    page = b"\n\n".join(_paragraphs(seed("003")) + _paragraphs(seed("001")))
    parts = _paragraphs(page)
    moved = b"\n\n".join(parts[1::2] + parts[0::2])  # the same text, reordered
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        arc.record("r.txt", page, at=t0)
        arc.record("r.txt", moved, at=t0 + 1)
        events = arc.history("r.txt")
    codecs, rows = _codecs(db_url), content_rows(db_url)
    base_id, depth, codec = codecs[events[1].content_id]
    assert (base_id, depth, codec) == (events[0].content_id, 1, content.ZSTD_BASE)
    payload = content.unpack(codec, rows[events[1].content_id]["data"], page)
    assert len(payload) > content.ZSTD_FROM  # the moved text is inserted text
    alone = content.pack(payload)[1]
    assert len(rows[events[1].content_id]["data"]) * 2 < len(alone)
    with reader(db_url) as fresh:
        assert fresh.show("r.txt", version=2).data == moved
        assert fresh.verify() == []
    with pytest.raises(ValueError):
        content.unpack(content.ZSTD_BASE, rows[events[1].content_id]["data"])  # no base
    _flip_a_byte(db_url, events[1].content_id, rows[events[1].content_id]["data"])
    with reader(db_url) as fresh:
        with pytest.raises(Damaged):
            fresh.show("r.txt", version=2)
        assert fresh.show("r.txt", version=1).data == page
        problems = fresh.verify()
    assert len(problems) == 1 and f"content {events[1].content_id}" in str(problems[0])


def test_a_full_chain_of_a_large_page_is_rebased_on_its_keyframe(db_url):
    """A large page changed in place (a section that comes and goes) is not given a new
    keyframe when its chain is full: the next delta is taken against the chain's keyframe,
    so the chain starts again at depth 1, and every replay stays within K deltas."""
    from archive.api import REBASE_FROM

    page = b"".join(seed(n) for n in ("000", "001", "002", "003", "004"))
    assert len(page) >= REBASE_FROM
    lines = page.splitlines(keepends=True)
    section = slice(len(lines) // 3, len(lines) // 3 + 6)
    versions = []
    for i in range(12):
        cut = lines[: section.start] + lines[section.stop :] if i % 2 else lines
        versions.append(b"".join(cut).replace(b"Iran", b"IRAN", i // 2))
    assert len(set(versions)) == len(versions)
    k = 3
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url, keyframe_interval=k) as arc:
        for i, data in enumerate(versions):
            arc.record("big.txt", data, at=t0 + i)
        events = arc.history("big.txt")
    codecs, rows = _codecs(db_url), content_rows(db_url)
    ids = [e.content_id for e in events]
    assert [codecs[i][1] for i in ids] == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]
    assert all(codecs[i][0] == ids[0] for i in (ids[4], ids[7], ids[10]))
    assert max(chain_length(rows, i) for i in ids) == k
    keyframe = len(rows[ids[0]]["data"])
    assert all(len(rows[i]["data"]) * 20 < keyframe for i in ids[1:])
    with reader(db_url, keyframe_interval=k) as fresh:
        for n, data in enumerate(versions, start=1):
            assert fresh.show("big.txt", version=n).data == data
        assert fresh.verify() == []


def test_a_small_page_gets_a_keyframe_when_its_chain_is_full(db_url):
    """Below REBASE_FROM a full chain ends in a new keyframe, as before: a rebase costs a
    coarse diff of versions far apart, and a small keyframe costs little."""
    page = seed("002")
    versions = [page.replace(b"Iran", b"IRAN", i) for i in range(6)]
    with Archive(db_url, keyframe_interval=2) as arc:
        for i, data in enumerate(versions):
            arc.record("s.txt", data, at=us("2020-01-02T10:00:00Z") + i)
        events = arc.history("s.txt")
    codecs = _codecs(db_url)
    assert [codecs[e.content_id][1] for e in events] == [0, 1, 2, 0, 1, 2]


def _exported(out: Path) -> dict[str, tuple[bytes, int | None]]:
    """Each exported file's bytes and time (a document's is its effective time), from a
    folder or a tar, in order."""
    if out.is_file():
        import tarfile

        with tarfile.open(out) as tar:
            return {
                m.name: (tar.extractfile(m).read(), None if m.name == "MANIFEST.json" else m.mtime)
                for m in tar.getmembers()
            }
    return {
        str(p.relative_to(out)): (
            p.read_bytes(), None if p.name == "MANIFEST.json" else p.stat().st_mtime_ns
        )
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _count_helpers(monkeypatch) -> list[int]:
    """A list that gets a 1 each time an export forks its helper process."""
    import archive.export

    made: list[int] = []
    forking = archive.export._Helper

    class Counted(forking):
        def __init__(self, *args):
            made.append(1)
            super().__init__(*args)

    monkeypatch.setattr(archive.export, "_Helper", Counted)
    return made


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_a_large_export_written_by_two_processes_is_the_same(db_url, tmp_path, monkeypatch, fmt):
    """From FORK_FROM documents an export forks a helper for half of them: the export is
    byte for byte and time for time the one a single process writes (a tar's members in the
    same order, names that need a pax header in both halves), and the parent's own
    connections still work afterwards."""
    import archive.export

    def key(i: int) -> str:
        name = f"{'ab'[i % 2]}/{i:03}.txt"
        if i % 7 == 3:
            return f"{'ab'[i % 2]}/{i:03}-ø.txt"  # not ASCII: a pax header
        return name if i % 11 != 5 else f"{'ab'[i % 2]}/{'x' * 120}{i:03}.txt"  # too long

    t0 = us("2020-01-02T10:00:00Z")
    lines = seed("002").splitlines(keepends=True)
    with Archive(db_url) as arc:
        arc.record_many(
            Version(key(i), b"".join(lines[i % 50 : i % 50 + 5 + v]), t0 + i * 10 + v)
            for v in range(3)
            for i in range(60)
        )
        single = arc.export(at=t0 + 10_000, out=tmp_path / "single", format=fmt)
        monkeypatch.setattr(archive.export, "FORK_FROM", 2)
        helpers = _count_helpers(monkeypatch)
        double = arc.export(at=t0 + 10_000, out=tmp_path / "double", format=fmt)
        assert helpers == [1]
        assert arc.show("a/000.txt").data == b"".join(lines[0:7])  # the parent reads on
        arc.record("a/000.txt", b"after", at=t0 + 20_000)  # and writes on
    assert len(single["documents"]) == len(double["documents"]) == 60
    assert list(_exported(tmp_path / "single").items()) == list(
        _exported(tmp_path / "double").items()
    )
    assert len(_exported(tmp_path / "double")) == 61
    if fmt == "tar":  # the same bytes up to the manifest (whose header holds the time now)
        import tarfile

        with tarfile.open(tmp_path / "single") as tar:
            manifest_at = tar.getmember("MANIFEST.json").offset
        one, two = (tmp_path / "single").read_bytes(), (tmp_path / "double").read_bytes()
        assert len(one) == len(two) and one[:manifest_at] == two[:manifest_at]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("archive")) == [
        "double", "single"
    ]


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_a_failure_in_the_export_helper_fails_the_export_and_leaves_nothing(
    db_url, tmp_path, monkeypatch, fmt
):
    """Damage that only the helper's half reads: the export fails with the helper's own
    error, no target and no staging folder are left, and the archive is as it was."""
    import archive.export

    monkeypatch.setattr(archive.export, "FORK_FROM", 2)
    helpers = _count_helpers(monkeypatch)
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        for i in range(6):
            arc.record(f"d{i}.txt", seed_lines("000", 10 + i), at=t0 + i)
        last = arc.history("d5.txt")[0]
    raw = raw_rows(db_url, f"SELECT data FROM contents WHERE id = {last.content_id}")
    _flip_a_byte(db_url, last.content_id, bytes(raw[0][0]))
    with Archive(db_url) as arc:
        with pytest.raises(Damaged, match=f"content {last.content_id}"):
            arc.export(at=t0 + 100, out=tmp_path / "out", format=fmt)
        assert arc.show("d0.txt").data == seed_lines("000", 10)
    assert helpers == [1]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("archive")] == []


@pytest.mark.parametrize("fork_from", [2, 10**9])
@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_an_event_whose_size_is_not_its_contents_fails_the_export(
    db_url, tmp_path, monkeypatch, fmt, fork_from
):
    """An event whose recorded size disagrees with its content (damage: a tar's layout and
    the manifest follow the event) fails the export, in one process or two, naming the
    event, and leaves nothing behind."""
    import archive.export

    monkeypatch.setattr(archive.export, "FORK_FROM", fork_from)
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        for i in range(6):
            arc.record(f"d{i}.txt", seed_lines("000", 10 + i), at=t0 + i)
        wrong = arc.history("d4.txt")[0]
    raw_sql(db_url, f"UPDATE events SET size = size + 1 WHERE position = {wrong.position}",
            bypass=("events",))
    damage = f"event {wrong.position} \\(d4.txt\\)"
    with Archive(db_url) as arc, pytest.raises(Damaged, match=damage):
        arc.export(at=t0 + 100, out=tmp_path / "out", format=fmt)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("archive")] == []


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_an_export_whose_helper_cannot_start_is_written_alone(db_url, tmp_path, monkeypatch, fmt):
    """Where the system refuses a new process, the export is written by this one, whole."""
    import os

    import archive.export

    def refused():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(archive.export, "FORK_FROM", 2)
    monkeypatch.setattr(os, "fork", refused)
    t0 = us("2020-01-02T10:00:00Z")
    with Archive(db_url) as arc:
        for i in range(6):
            arc.record(f"d{i}.txt", seed_lines("000", 10 + i), at=t0 + i)
        arc.export(at=t0 + 100, out=tmp_path / "out", format=fmt)
    exported = _exported(tmp_path / "out")
    assert sorted(exported) == ["MANIFEST.json"] + [f"d{i}.txt" for i in range(6)]
    assert exported["d5.txt"][0] == seed_lines("000", 15)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("archive")] == ["out"]
