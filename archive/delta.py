"""The delta codec: diff-match-patch deltas between two texts, exact in both directions.

Diffs are settled on the UTF-8 bytes as far as comparing bytes can settle them (common prefix
and suffix, anchors; see `byte_ops`), and what is left is diffed by the C++
fast-diff-match-patch (code points on Linux, no time limit, so the result is deterministic).
They are stored in a form that carries exactly the operations of the
reference implementation's `diff_toDelta` (see UTF8_FORM below; `to_dmp` gives its string);
replay applies them exactly, as `diff_fromDelta` does, never the fuzzy `patch_apply`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import fast_diff_match_patch
from diff_match_patch import diff_match_patch

_dmp = diff_match_patch()
_dmp.Diff_Timeout = 0  # a time limit makes diffs depend on CPU load

_OPS = {"=": 0, "-": -1, "+": 1}

# A character diff costs O(N·D): on a 300k-character middle with many edits it took minutes.
# A part that has no anchor (see byte_ops) is diffed by characters up to CHARS_UP_TO code
# points (both sides together), else by lines; a replaced block of lines is refined by words
# when it is at most WORDS_UP_TO (long lines: paragraphs, minified pages), and a replaced
# block of words by characters when at most CHARS_UP_TO. Decided by sizes alone, so the same
# inputs always give the same delta.
CHARS_UP_TO = 400
WORDS_UP_TO = 64_000
# Characters (both sides) that the parts without anchors of one diff may hand to `_middle`;
# past that a part is replaced whole, and the writer then stores a keyframe if the delta is
# not smaller than the full copy.
MIDDLE_UP_TO = 4_000_000
_WORDS = re.compile(r"\s+|\S+")
# A replaced block is diffed by words only while (words before) x (words after) stays below
# this: the cost of a diff grows with the product when the block was rewritten. On the real
# history, 16 M spent half the import on blocks whose word diff changed 95 % of the words;
# 250 k made the deltas 1 % larger.
WORD_PAIRS = 250_000
# Lines longer than this are diffed as sentences.
LONG_LINE = 400


def diff(old: str, new: str) -> list[tuple[int, str]]:
    """diff-match-patch diff tuples (-1, 0, 1) from `old` to `new` (see `byte_ops`)."""
    return [(op, piece.decode("utf-8")) for op, piece in byte_ops(old.encode(), new.encode())]


def byte_ops(old: bytes, new: bytes, *, coarse: bool = False) -> list[tuple[int, bytes]]:
    """The diff of two UTF-8 texts as operations on their bytes, each piece whole characters.

    Everything that can be settled by comparing bytes is, at memcmp speed: the common prefix
    and suffix are cut off, and a long changed middle is split at an anchor, a run of
    ANCHOR bytes found once in the old side (see `_anchor`), and each part is treated alike.
    Only what is left between anchors is decoded and diffed by diff-match-patch, with semantic
    clean-up (fewer, larger operations: smaller deltas, diffs that read as words); a large
    part without anchors is diffed by lines (see CHARS_UP_TO). Decided by the bytes alone, so
    the same inputs always give the same delta. `old` must be UTF-8; if `new` is not, this
    raises UnicodeDecodeError (the caller then stores it whole).

    `coarse` stops at the anchors: what lies between them, and parts up to LEAF bytes, are
    replaced whole, never diffed. That is for a delta compressed against its base
    (content.ZSTD_BASE), where zstd finds again what a finer diff would keep: on the chain
    workload's versions 50 to 200 apart it was as small and 3 to 10 times faster (about
    1.5 ms against 2-16).
    """
    out: list[tuple[int, bytes]] = []
    if coarse:
        _split(old, 0, len(old), new, 0, len(new), out, [0], LEAF)
    else:
        _split(old, 0, len(old), new, 0, len(new), out, [MIDDLE_UP_TO])
    return _merged(out)


# A run of this many bytes of the new side, found exactly once in the old, splits a middle;
# a run found more than once is lengthened, up to LONGEST_ANCHOR.
ANCHOR = 64
LONGEST_ANCHOR = 4096
# Parts at most this many bytes (both sides) are not split further: diffed by words (_leaf).
LEAF = 400
# Parts this small are replaced whole: semantic clean-up turns a changed word into a delete
# and an insert anyway, and each call of the C++ diff costs a few clock_gettime system calls
# (it checks its time limit even when there is none), 10-15 us a word on these machines.
TINY = 64
# Where probes are taken, in eighths of the new middle: the centre first.
_PROBES = (4, 2, 6, 3, 5, 1, 7)
_FOUND_ENOUGH = 3


def _split(
    a: bytes, alo: int, ahi: int, b: bytes, blo: int, bhi: int,
    out: list[tuple[int, bytes]], budget: list[int], whole: int = TINY,
) -> None:
    """Diff a[alo:ahi] against b[blo:bhi] into `out`. Parts are offsets, not copies: bytes
    are sliced only when emitted or decoded, so memory stays that of the two texts however
    deep the splitting goes. `budget` is the characters still allowed to the diffs of parts
    without anchors: past it a part is replaced whole (MIDDLE_UP_TO bounds the work). Parts
    up to `whole` bytes are replaced whole (TINY; LEAF in a coarse diff)."""
    head = _prefix_at(a, alo, ahi, b, blo, bhi)
    tail = _suffix_at(a, alo + head, ahi, b, blo + head, bhi)
    while head and alo + head < ahi and (a[alo + head] & 0xC0) == 0x80:
        head -= 1  # the prefix ended inside a character
    while tail and (a[ahi - tail] & 0xC0) == 0x80:
        tail -= 1  # the suffix began inside a character
    if head:
        out.append((0, a[alo : alo + head]))
    alo, blo, ahi, bhi = alo + head, blo + head, ahi - tail, bhi - tail
    size = (ahi - alo) + (bhi - blo)
    if alo == ahi or blo == bhi:
        if blo < bhi:
            inserted = b[blo:bhi]
            inserted.decode("utf-8")  # inserted text must be text
            out.append((1, inserted))
        elif alo < ahi:
            out.append((-1, a[alo:ahi]))
    elif size <= whole:
        inserted = b[blo:bhi]
        inserted.decode("utf-8")
        out += [(-1, a[alo:ahi]), (1, inserted)]
    elif size <= LEAF:
        old, new = a[alo:ahi].decode("utf-8"), b[blo:bhi].decode("utf-8")
        out += [(op, text.encode("utf-8")) for op, text in _leaf(old, new)]
    else:
        cut = _anchor(a, alo, ahi, b, blo, bhi)
        if cut is not None:
            i, j = cut  # both parts are smaller: blo < j < bhi
            _split(a, alo, i, b, blo, j, out, budget, whole)
            _split(a, i, ahi, b, j, bhi, out, budget, whole)
        else:
            old, new = a[alo:ahi].decode("utf-8"), b[blo:bhi].decode("utf-8")
            if len(old) + len(new) > budget[0]:
                out += [(-1, a[alo:ahi]), (1, b[blo:bhi])]
            else:
                budget[0] -= len(old) + len(new)
                out += [(op, text.encode("utf-8")) for op, text in _middle(old, new)]
    if tail:
        out.append((0, a[ahi : ahi + tail]))


def _anchor(a: bytes, alo: int, ahi: int, b: bytes, blo: int, bhi: int) -> tuple[int, int] | None:
    """Where to split a changed middle: the start (i in `a`, j in `b`) of a probe, a run of
    ANCHOR bytes of `b` found exactly once in `a`, so it is most likely unchanged text. Of
    the first few found, the one whose relative positions agree best: a probe inside a moved
    sentence is found far from where it was, and splitting there would cost the text it
    jumped over. Any split of this kind gives a correct diff; a poor one costs bytes only."""
    best: tuple[int, int, int] | None = None
    found = 0
    la, lb = ahi - alo, bhi - blo
    for eighth in _PROBES:
        j = blo + lb * eighth // 8
        while j < bhi and (b[j] & 0xC0) == 0x80:
            j += 1  # start on a character
        i = _unique_at(a, alo, ahi, b, j, bhi)
        if i is None:
            continue
        skew = abs((i - alo) * lb - (j - blo) * la)
        if best is None or skew < best[0]:
            best = (skew, i, j)
        found += 1
        if found == _FOUND_ENOUGH:
            break
    return None if best is None else (best[1], best[2])


def _unique_at(a: bytes, alo: int, ahi: int, b: bytes, j: int, bhi: int) -> int | None:
    """Where the probe at `j` in `b` is found in a[alo:ahi], if exactly once. A probe found
    more than once (boilerplate, repeated links) is lengthened, up to LONGEST_ANCHOR bytes."""
    size = ANCHOR
    while j + size <= bhi:
        probe = b[j : j + size]
        i = a.find(probe, alo, ahi)
        if i < 0:
            return None
        if a.find(probe, i + 1, ahi) < 0:
            return i
        if size >= LONGEST_ANCHOR:
            return None
        size *= 4
    return None


def changed_bytes(old: bytes, new: bytes) -> int:
    """Bytes outside the common prefix and suffix of two versions: a cheap estimate of how
    far apart they are (memcmp speed), to choose a base before diffing against it."""
    head = _common_prefix(old, new)
    tail = _common_suffix(old, new, min(len(old), len(new)) - head)
    return len(old) + len(new) - 2 * (head + tail)


def _merged(diffs: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Neighbouring operations of one kind as one (pieces diffed apart meet at the seams)."""
    out: list[tuple[int, bytes]] = []
    for op, text in diffs:
        if out and out[-1][0] == op:
            out[-1] = (op, out[-1][1] + text)
        else:
            out.append((op, text))
    return out


def _common_prefix(a: bytes | str, b: bytes | str) -> int:
    return _prefix_at(a, 0, len(a), b, 0, len(b))


def _common_suffix(a: bytes | str, b: bytes | str, most: int) -> int:
    """Length of the common suffix, at most `most` bytes (so it cannot overlap the prefix)."""
    return _suffix_at(a, len(a) - most, len(a), b, len(b) - most, len(b))


def _prefix_at(a: bytes | str, alo: int, ahi: int, b: bytes | str, blo: int, bhi: int) -> int:
    """Length of the common prefix of a[alo:ahi] and b[blo:bhi], by slice comparisons
    (memcmp): galloping out, then a binary search, so a short prefix (the usual case once a
    middle is split) costs a few comparisons, not one per halving of the whole."""
    most = min(ahi - alo, bhi - blo)
    low, step = 0, 16
    while low + step <= most and a[alo + low : alo + low + step] == b[blo + low : blo + low + step]:
        low += step
        step *= 2
    high = min(low + step, most)
    while low < high:
        mid = (low + high + 1) // 2
        if a[alo + low : alo + mid] == b[blo + low : blo + mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _suffix_at(a: bytes | str, alo: int, ahi: int, b: bytes | str, blo: int, bhi: int) -> int:
    """Length of the common suffix of a[alo:ahi] and b[blo:bhi], searched as `_prefix_at`."""
    most = min(ahi - alo, bhi - blo)
    low, step = 0, 16
    while low + step <= most and a[ahi - low - step : ahi - low] == b[bhi - low - step : bhi - low]:
        low += step
        step *= 2
    high = min(low + step, most)
    while low < high:
        mid = (low + high + 1) // 2
        if a[ahi - mid : ahi - low] == b[bhi - mid : bhi - low]:
            low = mid
        else:
            high = mid - 1
    return low


def _chars(old: str, new: str) -> list[tuple[int, str]]:
    raw = fast_diff_match_patch.diff(
        old, new, timelimit=0, checklines=False, cleanup="Semantic", counts_only=False
    )
    return [(_OPS[op], text) for op, text in raw if text]


def _leaf(old: str, new: str) -> list[tuple[int, str]]:
    """A small part between anchors, diffed by words; each replaced run of words is trimmed
    of its common prefix and suffix (a typo is the characters it changed). Not by characters:
    the C++ diff checks the clock at every step of its bisection, a system call here, so two
    unlike 200-character parts cost 190 us to find that they are unlike; by words the steps
    are as many words."""
    return _by_tokens(_WORDS.findall(old), _WORDS.findall(new), _trimmed_run)


def _trimmed_run(old: str, new: str) -> list[tuple[int, str]]:
    return _trimmed(old, new, _replaced)


def _replaced(old, new) -> list:
    """`old` deleted and `new` inserted, whichever is not empty (texts or token lists)."""
    return [(op, part) for op, part in ((-1, old), (1, new)) if part]


def _middle(old: str, new: str) -> list[tuple[int, str]]:
    if len(old) + len(new) <= CHARS_UP_TO:
        return _chars(old, new)
    return _by_tokens(_pieces(old), _pieces(new), _words)


def _pieces(text: str) -> list[str]:
    """Lines, and long lines (paragraphs, minified pages) cut after each ". ": scattered
    edits in a page of long paragraphs then fall in small replaced blocks. (str.split, not a
    regular expression: this runs on every large change.)"""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for line in lines:
        if len(line) <= LONG_LINE:
            out.append(line)
            continue
        parts = line.split(". ")
        pieces = [". "] * (2 * len(parts) - 1)
        pieces[::2] = parts
        out += filter(None, pieces) if "" in parts else pieces
    return out


def _trimmed(old: str, new: str, inner) -> list[tuple[int, str]]:
    """`inner` on what lies between the common prefix and suffix of a replaced block: a
    paragraph with one word changed is a few characters to diff, not a paragraph of words."""
    head = _common_prefix(old, new)
    tail = _common_suffix(old, new, min(len(old), len(new)) - head)
    result = [(0, old[:head])] if head else []
    result += inner(old[head : len(old) - tail], new[head : len(new) - tail])
    if tail:
        result.append((0, old[len(old) - tail :]))
    return result


def _words(old: str, new: str) -> list[tuple[int, str]]:
    return _trimmed(old, new, _words_middle)


def _words_middle(old: str, new: str) -> list[tuple[int, str]]:
    if not old or not new:
        return _replaced(old, new)
    if len(old) + len(new) <= CHARS_UP_TO:
        return _chars(old, new)
    if len(old) + len(new) > WORDS_UP_TO:
        return [(-1, old), (1, new)]
    a, b = _WORDS.findall(old), _WORDS.findall(new)
    if len(a) * len(b) > WORD_PAIRS:  # a rewrite: O(N·D) would take a second for little
        return [(-1, old), (1, new)]
    return _by_tokens(a, b, _refine)


def _refine(old: str, new: str) -> list[tuple[int, str]]:
    return _trimmed(old, new, _refine_middle)


def _refine_middle(old: str, new: str) -> list[tuple[int, str]]:
    if old and new and len(old) + len(new) <= CHARS_UP_TO:
        return _chars(old, new)
    return _replaced(old, new)


def _by_tokens(a: list[str], b: list[str], replaced) -> list[tuple[int, str]]:
    """Diff by tokens; each block of tokens replaced by others goes to `replaced`."""
    result: list[tuple[int, str]] = []
    gone = came = ""
    for op, tokens in tokens_diff(a, b):
        text = "".join(tokens)
        if op == -1:
            gone += text
        elif op == 1:
            came += text
        else:
            if gone and came:
                result += replaced(gone, came)
            else:
                result += _replaced(gone, came)
            gone = came = ""
            result.append((0, text))
    if gone and came:
        return result + replaced(gone, came)
    return result + _replaced(gone, came)


def tokens_diff(a: list[str], b: list[str]) -> list[tuple[int, list[str]]]:
    """Diff two token lists (lines, words) as diff-match-patch's line mode does: each
    distinct token becomes one character, the short strings are diffed, then mapped back."""
    distinct = dict.fromkeys(a)
    distinct.update(dict.fromkeys(b))
    if len(distinct) > _MAX_TOKENS:
        return _replaced(a, b)
    # Code points from 1 up, skipping the surrogates (they cannot stand alone in a str).
    table = {
        token: chr(n if n < 0xD800 else n + 0x800) for n, token in enumerate(distinct, start=1)
    }
    back = {char: token for token, char in table.items()}
    chars_a = "".join(map(table.__getitem__, a))
    chars_b = "".join(map(table.__getitem__, b))
    if _lopsided(chars_a, chars_b):
        return _replaced(a, b)
    raw = fast_diff_match_patch.diff(
        chars_a, chars_b, timelimit=0, checklines=False, cleanup="Semantic", counts_only=False
    )
    return [(_OPS[op], list(map(back.__getitem__, text))) for op, text in raw if text]


_MAX_TOKENS = 0x10FFFF - 0x800  # one code point per distinct token

# A diff of a short token list against a long one costs at least the square of the
# difference in the bisection (it has that many insertions to place): 35 lines against 1,649
# took 2.7 ms, and a page's 5 against 17,501 lines 15 ms, for at most the short side kept.
# Past these sizes the short side is replaced whole unless it is a contiguous run of the long
# one (which the diff finds at once); the delta is larger by at most the short side's text.
LOPSIDED_FROM = 512  # tokens the long side has beyond the short one
LOPSIDED_RATIO = 8


def _lopsided(chars_a: str, chars_b: str) -> bool:
    short, long = sorted((chars_a, chars_b), key=len)
    return (
        len(long) - len(short) > LOPSIDED_FROM
        and len(short) * LOPSIDED_RATIO <= len(long)
        and short not in long
    )


# Stored form of a delta. diff_toDelta's text percent-encodes inserted text (every non-ASCII
# byte becomes three characters, which zlib only partly wins back) and counts UTF-16 code
# units, so applying it means re-encoding the whole base to UTF-16 and the result back to
# UTF-8 on every replay: for a 16 KB page with emoji that is most of a read. The stored form
# carries the same operations, counted in UTF-8 bytes of the same pieces, with the inserted
# text as it is:
#     b"\x02" + b"\t".join(b"=n" | b"-n" | b"+n") + b"\x00" + all inserted text, in order
# so replay is byte slicing on the stored bytes, and the cache holds only bytes. `to_dmp` turns
# it back into exactly what diff_toDelta gives. Replay also takes diff_toDelta's own form and
# the earlier stored form (b"\x01", UTF-16 counts), for archives written before this one.
UTF8_FORM = b"\x02"
UTF16_FORM = b"\x01"


def make(old: str | bytes, new: str | bytes, *, coarse: bool = False) -> bytes:
    """The delta that turns `old` into `new`, in the stored form: the operations of
    `byte_ops` (coarse or not), each counted in UTF-8 bytes. Raises UnicodeDecodeError if
    `new` is not UTF-8 (`old` must be)."""
    if isinstance(old, str):
        old = old.encode("utf-8")
    if isinstance(new, str):
        new = new.encode("utf-8")
    ops = byte_ops(old, new, coarse=coarse)
    counts = b"\t".join(b"%s%d" % (_SIGN[op], len(piece)) for op, piece in ops)
    return UTF8_FORM + counts + b"\x00" + b"".join(piece for op, piece in ops if op == 1)


_SIGN = {0: b"=", -1: b"-", 1: b"+"}


def to_dmp(old: str, stored: bytes | str) -> str:
    """The delta as diff_toDelta writes it (for other diff-match-patch tools)."""
    if isinstance(stored, str):
        stored = stored.encode("utf-8")
    if stored.startswith(UTF8_FORM):
        pieces = _ops8(old.encode("utf-8"), stored)
        return _dmp.diff_toDelta([(op, piece.decode("utf-8")) for op, piece in pieces])
    if stored.startswith(UTF16_FORM):
        pieces = _ops16(old.encode("utf-16-be"), stored.decode("utf-8"))
        return _dmp.diff_toDelta([(op, piece.decode("utf-16-be")) for op, piece in pieces])
    return stored.decode("ascii")


def apply(old: str, delta: bytes | str) -> str:
    """Rebuild the new text from `old` and a delta (any accepted form); raises ValueError if
    the delta does not fit `old` (the caller still checks the hash: a wrong base of the same
    length passes here)."""
    return apply_chain(old, [delta])


def apply_chain(base: str | bytes, deltas: list[bytes | str]) -> str | bytes:
    """Apply successive deltas, exactly as repeated `diff_fromDelta` would. A `str` base
    gives a `str`; a `bytes` base (UTF-8) gives bytes without ever decoding, which is what
    replay uses. The tests check it against `diff_fromDelta`, and replay checks the SHA-256
    of the result."""
    as_str = isinstance(base, str)
    buffer = base.encode("utf-8") if as_str else bytes(base)
    for step in deltas:
        if isinstance(step, str):
            step = step.encode("utf-8")
        if step.startswith(UTF8_FORM):
            buffer = _apply8(buffer, step)
        else:  # an older form: through UTF-16, as it counts
            rebuilt = _apply16(buffer.decode("utf-8").encode("utf-16-be"), step.decode("utf-8"))
            buffer = rebuilt.decode("utf-16-be").encode("utf-8")
    return buffer.decode("utf-8") if as_str else buffer


def apply_stored(base: bytes, stored: bytes) -> bytes:
    """One stored delta over UTF-8 bytes (replay's step): `apply_chain` without its list
    and type checks for the usual form (cold reads on main 4-5 % faster)."""
    if stored[:1] == UTF8_FORM:
        return _apply8(base, stored)
    return apply_chain(base, [stored])  # type: ignore[return-value]


_WELL_FORMED = re.compile(rb"[=+-][0-9]+(?:\t[=+-][0-9]+)*")


def _apply8(buffer: bytes, delta: bytes) -> bytes:
    """The hot path of replay: one stored-form delta over UTF-8 bytes, in one pass. The
    operations are checked by one regular expression first, so the loop does no checking.
    (Parsing into slices once and keeping them was tried: most deltas are applied once, and
    building the slices cost twice this pass on main's deltas, 5.0 us against 2.35.)"""
    ops, found, added = delta[1:].partition(b"\x00")
    if not found:
        raise ValueError("stored delta has no inserted-text section")
    if ops and _WELL_FORMED.fullmatch(ops) is None:
        raise ValueError(f"invalid operations in delta: {ops[:40]!r}")
    pieces: list[bytes] = []
    append = pieces.append
    pointer = cursor = 0
    for token in ops.split(b"\t") if ops else ():
        count = int(token[1:])
        op = token[0]
        if op == 61:  # =
            append(buffer[pointer : pointer + count])
            pointer += count
        elif op == 45:  # -
            pointer += count
        else:  # +
            append(added[cursor : cursor + count])
            cursor += count
    if pointer != len(buffer) or cursor != len(added):
        raise ValueError(f"delta length ({pointer}) does not equal source length ({len(buffer)})")
    return b"".join(pieces)


def _ops8(buffer: bytes, delta: bytes) -> list[tuple[int, bytes]]:
    """The stored form's operations over `buffer` (UTF-8), each with its bytes."""
    ops, found, added = delta[1:].partition(b"\x00")
    if not found:
        raise ValueError("stored delta has no inserted-text section")
    out: list[tuple[int, bytes]] = []
    pointer = cursor = 0
    for token in ops.split(b"\t") if ops else ():
        op, count = token[:1], _count(token[1:].decode("ascii"))
        if op == b"+":
            out.append((1, added[cursor : cursor + count]))
            cursor += count
        elif op in (b"=", b"-"):
            out.append((0 if op == b"=" else -1, buffer[pointer : pointer + count]))
            pointer += count
        else:
            raise ValueError(f"invalid diff operation in delta: {op!r}")
    if pointer != len(buffer) or cursor != len(added):
        raise ValueError("stored delta does not fit its base")
    return out


def _apply16(buffer: bytes, delta: str) -> bytes:
    """A UTF-16-counted delta (the earlier stored form, or diff_toDelta's own) over a
    UTF-16-BE buffer."""
    return b"".join(piece for op, piece in _ops16(buffer, delta) if op != -1)


def _ops16(buffer: bytes, delta: str) -> list[tuple[int, bytes]]:
    """A UTF-16-counted delta's operations over `buffer` (UTF-16-BE), each with its bytes:
    the earlier stored form, or diff_toDelta's own."""
    out: list[tuple[int, bytes]] = []
    pointer = 0
    if delta.startswith(UTF16_FORM.decode()):
        ops, found, inserted = delta[1:].partition("\x00")
        if not found:
            raise ValueError("stored delta has no inserted-text section")
        added = inserted.encode("utf-16-be")
        cursor = 0
        for token in ops.split("\t") if ops else ():
            op, count = token[:1], _count(token[1:])
            if op == "+":
                out.append((1, added[cursor : cursor + 2 * count]))
                cursor += 2 * count
            elif op == "=":
                out.append((0, buffer[pointer : pointer + 2 * count]))
                pointer += 2 * count
            elif op == "-":
                out.append((-1, buffer[pointer : pointer + 2 * count]))
                pointer += 2 * count
            else:
                raise ValueError(f"invalid diff operation in delta: {op!r}")
        if cursor != len(added):
            raise ValueError("stored delta's inserted text does not match its operations")
    else:
        for token in delta.split("\t"):
            if not token:
                continue
            op, param = token[0], token[1:]
            if op == "+":
                out.append((1, unquote(param).encode("utf-16-be")))
                continue
            if op not in "=-":
                raise ValueError(f"invalid diff operation in delta: {op!r}")
            count = _count(param)
            out.append((0 if op == "=" else -1, buffer[pointer : pointer + 2 * count]))
            pointer += 2 * count
    if pointer != len(buffer):
        raise ValueError(
            f"delta length ({pointer // 2}) does not equal source length ({len(buffer) // 2})"
        )
    return out


def _count(param: str) -> int:
    if not param.isdigit() or not param.isascii():
        raise ValueError(f"invalid number in delta: {param!r}")
    return int(param)
