"""Property: for any sequence of versions (text with emoji, Persian, CRLF, NUL, BOM, NFD, empty,
and arbitrary binary), recorded with increasing effective times and a small keyframe interval,
replaying each version at its own time and by its number gives back its exact bytes, on both
engines. Each example writes a document of its own in a database shared by the examples."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, make_url

from archive import Archive

SEEDS = Path(__file__).resolve().parent.parent / "seeds"
K = 3
T0 = 1_577_923_200_000_000  # 2020-01-02T00:00:00Z in microseconds

SPECIAL = [
    "\r\n", "\n", "\r", "\x00", "\ufeff", " ", "\t",
    "👍🏽", "👨‍👩‍👧", "🇮🇷", "𝄞",
    "سلام", "می‌خواهم", "۱۲۳", "،",
    "e\u0301", "é", "ﬁ", "\u2028", "\U0010fffd",
]
fragments = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(st.characters(codec="utf-8"), max_size=8),
)
texts = st.lists(fragments, max_size=10).map("".join)


def _seed_cuts() -> list[str]:
    cuts = []
    for path in sorted(SEEDS.glob("0*.txt")):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        cuts += ["".join(lines[:n]) for n in (1, 6, 25)]
    return cuts


starts = st.one_of(texts, st.sampled_from(_seed_cuts()))
steps = st.one_of(
    st.tuples(st.just("append"), texts),
    st.tuples(st.just("insert"), st.integers(0, 10**6), texts),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(0, 80)),
    st.tuples(st.just("replace"), starts),
    st.tuples(st.just("binary"), st.binary(max_size=300)),
    st.tuples(st.just("revert"), st.integers(0, 10**6)),
    st.tuples(st.just("same")),
    st.tuples(st.just("empty")),
)
histories = st.tuples(
    starts,
    st.lists(st.tuples(steps, st.integers(1, 3_600_000_000)), max_size=12),
)


def build(start: str, plan: list) -> list[tuple[int, bytes]]:
    """(effective time, bytes) of each version, times strictly increasing."""
    text = start
    versions = [(T0, text.encode("utf-8"))]
    at = T0
    for step, gap in plan:
        kind = step[0]
        data: bytes
        if kind == "append":
            text += step[1]
        elif kind == "insert":
            i = step[1] % (len(text) + 1)
            text = text[:i] + step[2] + text[i:]
        elif kind == "delete":
            i = step[1] % (len(text) + 1)
            text = text[:i] + text[i + step[2] :]
        elif kind == "replace":
            text = step[1]
        elif kind == "empty":
            text = ""
        if kind == "binary":
            data = step[1]
        elif kind == "revert":
            data = versions[step[1] % len(versions)][1]
        elif kind == "same":
            data = versions[-1][1]
        else:
            data = text.encode("utf-8")
        at += gap
        versions.append((at, data))
    return versions


def _chains(db_url: str) -> tuple[int, int]:
    """(number of delta contents, longest run of deltas down to a keyframe)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            base = dict(conn.exec_driver_sql("SELECT id, base_id FROM contents").fetchall())
    finally:
        engine.dispose()
    deltas = sum(1 for b in base.values() if b is not None)
    longest = 0
    for content_id in base:
        n, current = 0, base[content_id]
        while current is not None:
            n += 1
            current = base[current]
        longest = max(longest, n)
    return deltas, longest


def test_every_version_replays_exactly_at_its_time_and_by_number(db_url):
    sqlite = make_url(db_url).get_backend_name() == "sqlite"
    numbers = itertools.count()
    with Archive(db_url, keyframe_interval=K) as writer, Archive(
        db_url, keyframe_interval=K, cache_bytes=0
    ) as reader:

        @settings(
            max_examples=40 if sqlite else 20,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(histories)
        def check(history):
            start, plan = history
            versions = build(start, plan)
            key = f"prop/{next(numbers)}.txt"
            expected_seq = []
            seq = 0
            previous = None
            for at, data in versions:
                status = writer.record(key, data, at=at).status
                if data == previous:
                    assert status == "unchanged"
                else:
                    assert status in ("created", "modified")
                    seq += 1
                expected_seq.append(seq)
                previous = data
            events = reader.history(key)
            assert [e.seq for e in events] == list(range(1, seq + 1))
            for (at, data), n in zip(versions, expected_seq, strict=True):
                by_time = reader.show(key, at=at)
                assert by_time.data == data
                assert by_time.event.seq == n
                assert by_time.event.sha256 == hashlib.sha256(data).digest()
                assert reader.show(key, version=n).data == data

        check()
        deltas, longest = _chains(db_url)
        assert deltas > 0  # the examples did exercise delta replay
        assert longest <= K
        assert reader.verify() == []


@settings(max_examples=300, deadline=None)
@given(old=texts, new=texts)
def test_stored_delta_is_diff_match_patch_delta(old, new):
    """The stored delta form carries exactly diff_toDelta's operations: turned back it equals
    diff_toDelta's output, diff_fromDelta rebuilds `new` from it, and replay accepts both."""
    from diff_match_patch import diff_match_patch

    from archive import delta

    dmp = diff_match_patch()
    stored = delta.make(old, new)
    classic = delta.to_dmp(old, stored)
    assert classic == dmp.diff_toDelta(delta.diff(old, new))
    assert "".join(t for op, t in dmp.diff_fromDelta(old, classic) if op != -1) == new
    assert delta.apply(old, stored) == new
    assert delta.apply(old, classic) == new
    assert delta.apply_chain(old, [stored, delta.make(new, old)]) == old


def _utf16_form(old: str, new: str) -> str:
    """The stored form archives wrote before deltas counted UTF-8 bytes: the same operations,
    counted in UTF-16 code units, after a \\x01 marker."""
    from archive import delta

    ops, inserted = [], []
    for op, text in delta.diff(old, new):
        n = len(text.encode("utf-16-be")) // 2
        ops.append({0: "=", -1: "-", 1: "+"}[op] + str(n))
        if op == 1:
            inserted.append(text)
    return "\x01" + "\t".join(ops) + "\x00" + "".join(inserted)


@settings(max_examples=200, deadline=None)
@given(old=texts, new=texts, newer=texts)
def test_deltas_of_every_stored_form_replay_on_bytes(old, new, newer):
    """Replay works on UTF-8 bytes and still takes the earlier UTF-16 form and diff_toDelta's
    own, mixed in one chain, with the same result as on text."""
    from archive import delta

    steps = [_utf16_form(old, new).encode(), delta.make(new, newer)]
    assert delta.apply_chain(old.encode(), steps) == newer.encode()
    assert delta.apply_chain(old, steps) == newer
    assert delta.to_dmp(old, steps[0]) == delta.to_dmp(old, delta.make(old, new))
    classic = delta.to_dmp(old, delta.make(old, new))
    assert delta.apply_chain(old.encode(), [classic.encode(), steps[1]]) == newer.encode()


def _seed_lines() -> list[str]:
    lines = []
    for path in sorted(SEEDS.glob("0*.txt")):
        lines += path.read_text(encoding="utf-8").splitlines(keepends=True)
    return lines


SEED_LINES = _seed_lines()
# Long texts of the seeds' own lines, with repeats (the live thread repeats an article), and
# edits that cut, move, duplicate and splice them: the changed middles these give are long
# enough to be split at anchors, and repeated lines make anchors ambiguous.
long_texts = st.lists(st.sampled_from(SEED_LINES), min_size=5, max_size=60).map("".join)
edits = st.lists(
    st.tuples(
        st.sampled_from(["cut", "move", "copy", "splice"]),
        st.floats(0, 1), st.floats(0, 1), st.integers(0, 400), fragments,
    ),
    min_size=1, max_size=6,
)


def _edited(text: str, plan: list) -> str:
    for kind, a, b, n, fragment in plan:
        i, j = int(a * len(text)), int(b * len(text))
        piece = text[i : i + n]
        if kind == "cut":
            text = text[:i] + text[i + n :]
        elif kind == "move":
            rest = text[:i] + text[i + n :]
            j = min(j, len(rest))
            text = rest[:j] + piece + rest[j:]
        elif kind == "copy":
            text = text[:j] + piece + text[j:]
        else:
            text = text[:i] + fragment + text[i + n :]
    return text


@settings(max_examples=300, deadline=None)
@given(old=long_texts, plan=edits)
def test_long_texts_split_at_anchors_give_exact_dmp_deltas(old, plan):
    """Long edited texts go through the byte-level splitting (prefix, suffix, anchors): the
    delta still rebuilds the text exactly, through both the stored form and diff_toDelta's,
    and every piece is whole characters."""
    from diff_match_patch import diff_match_patch

    from archive import delta

    new = _edited(old, plan)
    dmp = diff_match_patch()
    stored = delta.make(old, new)
    assert delta.apply(old, stored) == new
    assert delta.apply_chain(old.encode(), [stored]) == new.encode()
    classic = delta.to_dmp(old, stored)
    assert classic == dmp.diff_toDelta(delta.diff(old, new))
    assert "".join(t for op, t in dmp.diff_fromDelta(old, classic) if op != -1) == new


@settings(max_examples=300, deadline=None)
@given(old=long_texts, plan=edits)
def test_coarse_deltas_compressed_against_their_base_are_exact(old, plan):
    """A coarse delta (anchors only, the rest replaced whole) is an exact dmp delta too,
    and packed against its base it unpacks only with that base."""
    from archive import content, delta

    new = _edited(old, plan)
    base = old.encode()
    stored = delta.make(base, new.encode(), coarse=True)
    assert delta.apply_chain(base, [stored]) == new.encode()
    assert delta.apply(old, delta.to_dmp(old, stored)) == new
    codec, blob = content.pack(stored, base)
    assert content.unpack(codec, blob, base) == stored


@settings(max_examples=300, deadline=None)
@given(old=long_texts, at=st.floats(0, 1), cut=st.integers(0, 40), junk=st.binary(max_size=6))
def test_make_refuses_new_bytes_that_are_not_utf8(old, at, cut, junk):
    """`make` takes bytes and decodes only what changed: a new version that is not UTF-8
    raises UnicodeDecodeError (the writer then stores it whole), and one that is gets an
    exact delta. Splicing raw bytes anywhere, inside characters too, tests both."""
    import pytest

    from archive import delta

    base = old.encode()
    i = int(at * len(base))
    new = base[:i] + junk + base[i + cut :]
    try:
        new.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            delta.make(base, new)
    else:
        assert delta.apply_chain(base, [delta.make(base, new)]) == new


def test_a_moved_block_costs_about_the_smaller_side():
    """A move is a delete and an insert of one side: of the moved sentence, not of the text
    it jumped over; of the shorter of two blocks that swap places, not of the longer."""
    from archive import delta

    text = "".join(SEED_LINES[:120])
    sentence = next(line for line in SEED_LINES[:120] if len(line) > 150)
    assert len(text) > 20 * len(sentence) and text.count(sentence) == 1
    at = text.index(sentence)
    rest = text[:at] + text[at + len(sentence) :]
    far = len(rest) - 100
    moved = rest[:far] + sentence + rest[far:]
    stored = delta.make(text, moved)
    assert delta.apply(text, stored) == moved
    assert len(stored) < 3 * len(sentence.encode()) + 100

    head, long, short, tail = text[:500], text[500:8500], text[8500:11500], text[11500:]
    swapped = head + short + long + tail
    stored = delta.make(text, swapped)
    assert delta.apply(text, stored) == swapped
    assert len(stored) < len(short.encode()) + 200 < len(long.encode())


def test_a_damaged_delta_is_a_value_error_never_a_wrong_result():
    """Whatever damage a stored delta has, applying it raises ValueError (which replay
    reports as damage), never another error or bytes that merely look right."""
    import pytest

    from archive import delta

    base = b"abcdef"
    damaged = [
        b"\x02=6",  # no inserted-text section
        b"\x02=6\t\x00",  # an empty operation
        b"\x02=3\t+5\x00ab",  # inserts more than it carries
        b"\x02=6\x00xyz",  # carries text it never inserts
        b"\x02=6\t+\x00",  # a count missing
        b"\x02=-6\x00",  # a negative count
        b"\x02=\xd9\xa1\x00",  # a non-ASCII digit
        b"\x02*6\x00",  # an unknown operation
        b"\x02=5\x00",  # shorter than its base
        b"\x02=7\x00",  # longer than its base
    ]
    for stored in damaged:
        with pytest.raises(ValueError):
            delta.apply_chain(base, [stored])
    assert delta.apply_chain(base, [b"\x02=2\t+0\t-1\t+2\t=3\x00xy"]) == b"abxydef"
    assert delta.apply_chain(base, [b"\x02-6\x00"]) == b""
    many = b"\x02" + b"\t".join([b"=1"] * 200_000) + b"\x00"  # one regular expression
    assert delta.apply_chain(b"x" * 200_000, [many]) == b"x" * 200_000


def test_a_few_lines_against_a_page_many_times_longer_are_replaced_unless_a_run_of_it():
    """A diff of a short side against a far longer one costs at least the square of the
    difference and can keep only the short side: past LOPSIDED_* it is replaced whole,
    unless it is one run of the long side, which is kept. Either way the delta is exact."""
    from archive import delta

    page = [f"paragraph {i} of a long page\n" for i in range(1000)]
    scattered, run = page[::25], page[300:340]
    assert len(page) - len(scattered) > delta.LOPSIDED_FROM
    assert len(scattered) * delta.LOPSIDED_RATIO <= len(page)
    assert delta.tokens_diff(scattered, page) == [(-1, scattered), (1, page)]
    assert delta.tokens_diff(page, scattered) == [(-1, page), (1, scattered)]
    chars = "".join(chr(0x100 + i) for i in range(1000))  # one character per token
    assert delta._lopsided(chars[::25], chars) and delta._lopsided(chars, chars[::25])
    assert not delta._lopsided(chars[300:340], chars)  # a run: the diff finds it at once
    assert not delta._lopsided(chars[::2], chars)  # not lopsided: diffed as before
    near = page[:600]
    assert delta.tokens_diff(near, page) == [(0, near), (1, page[600:])]
    for old, new in ((scattered, page), (page, scattered), (run, page)):
        old_text, new_text = "".join(old), "".join(new)
        assert delta.apply(old_text, delta.make(old_text, new_text)) == new_text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
numbers = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=500, deadline=None)
@given(
    position=numbers,
    doc_id=numbers,
    seq=numbers,
    size=numbers,
    recorded_at=numbers,
    effective_at=numbers,
    type=st.sampled_from(["created", "modified", "deleted", "renamed"]),
    key=texts,
    sha256=st.none() | st.binary(min_size=32, max_size=32),
    meta=st.none() | st.dictionaries(texts, json_values, max_size=4),
)
def test_canonical_bytes_are_json_dumps_of_the_fields(**fields):
    """The hand-written canonical form is byte for byte json.dumps' (the form every stored
    event_hash was made with), for any key, metadata and numbers."""
    from archive.events import canonical, canonical_reference

    assert canonical(**fields) == canonical_reference(fields)


def test_canonical_form_is_unchanged():
    """A fixed event's canonical bytes, as archives have always hashed them."""
    from archive.events import canonical

    got = canonical(
        position=7,
        doc_id=2,
        seq=3,
        type="modified",
        key="a/ß 👍.txt",
        sha256=bytes(range(32)),
        size=40,
        recorded_at=1_600_000_000_000_001,
        effective_at=-5,
        meta={"z": 1, "a": [True]},
    )
    assert got == (
        b'{"doc":2,"effective_at":-5,"key":"a/\\u00df \\ud83d\\udc4d.txt","meta":{"a":[true],'
        b'"z":1},"position":7,"recorded_at":1600000000000001,"seq":3,"sha256":"000102030405'
        b'060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f","size":40,"type":"modified"}'
    )
    assert canonical(
        position=True,
        doc_id=2,
        seq=3,
        type="deleted",
        key="k",
        sha256=None,
        size=0,
        recorded_at=1,
        effective_at=1,
        meta=None,
    ).startswith(b'{"doc":2,"effective_at":1,"key":"k","meta":null,"position":true,')
