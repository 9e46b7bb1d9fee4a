"""The delta codec: diff-match-patch deltas between two texts, exact in both directions.

Diffs are computed by the C++ fast-diff-match-patch (code points on Linux, no time limit, so
the result is deterministic) and serialised with the reference implementation's
`diff_toDelta`; replay uses `diff_fromDelta`, never the fuzzy `patch_apply`. Both ends work on
the same Python `str`, so the delta's UTF-16 lengths are computed and read by one library.
"""

from __future__ import annotations

from urllib.parse import unquote

import fast_diff_match_patch
from diff_match_patch import diff_match_patch

_dmp = diff_match_patch()
_dmp.Diff_Timeout = 0  # a time limit makes diffs depend on CPU load

_OPS = {"=": 0, "-": -1, "+": 1}

# A character diff costs O(N·D): on a 300k-character middle with many edits it took minutes.
# Above this many code points (both sides together) the middle is diffed by lines, and only
# replaced blocks up to REDIFF_BELOW are refined by characters. Decided by sizes alone, so the
# same inputs always give the same delta.
CHARS_UP_TO = 4_000
REDIFF_BELOW = 512


def diff(old: str, new: str) -> list[tuple[int, str]]:
    """diff-match-patch diff tuples (-1, 0, 1) from `old` to `new`.

    The common prefix and suffix are found on the UTF-8 bytes first (slice comparisons run at
    memcmp speed), moved back to character boundaries, and only the middle is diffed, with
    semantic clean-up: fewer, larger operations make smaller deltas and diffs that read as
    words. Large middles are diffed by lines (see CHARS_UP_TO).
    """
    if old == new:
        return [(0, old)] if old else []
    if not old or not new:
        return [(1, new)] if new else [(-1, old)]
    a, b = old.encode("utf-8"), new.encode("utf-8")
    head = _common_prefix(a, b)
    tail = _common_prefix(a[head:][::-1], b[head:][::-1])
    while head and head < len(a) and (a[head] & 0xC0) == 0x80:
        head -= 1  # the prefix ended inside a character
    while tail and (a[len(a) - tail] & 0xC0) == 0x80:
        tail -= 1  # the suffix began inside a character
    head_chars = len(a[:head].decode("utf-8"))
    tail_chars = len(a[len(a) - tail :].decode("utf-8")) if tail else 0
    result = [(0, old[:head_chars])] if head_chars else []
    result += _middle(
        old[head_chars : len(old) - tail_chars], new[head_chars : len(new) - tail_chars]
    )
    if tail_chars:
        result.append((0, old[len(old) - tail_chars :]))
    return result


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix, by binary search over slice comparisons (memcmp)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _chars(old: str, new: str) -> list[tuple[int, str]]:
    raw = fast_diff_match_patch.diff(
        old, new, timelimit=0, checklines=False, cleanup="Semantic", counts_only=False
    )
    return [(_OPS[op], text) for op, text in raw if text]


def _middle(old: str, new: str) -> list[tuple[int, str]]:
    if len(old) + len(new) <= CHARS_UP_TO:
        return _chars(old, new)
    result: list[tuple[int, str]] = []
    gone = came = ""
    for op, lines in tokens_diff(old.splitlines(keepends=True), new.splitlines(keepends=True)):
        text = "".join(lines)
        if op == -1:
            gone += text
        elif op == 1:
            came += text
        else:
            result += _replaced(gone, came)
            gone = came = ""
            result.append((0, text))
    return result + _replaced(gone, came)


def _replaced(gone: str, came: str) -> list[tuple[int, str]]:
    if gone and came and len(gone) + len(came) <= REDIFF_BELOW:
        return _chars(gone, came)
    return [(op, text) for op, text in ((-1, gone), (1, came)) if text]


def tokens_diff(a: list[str], b: list[str]) -> list[tuple[int, list[str]]]:
    """Diff two token lists (lines, words) as diff-match-patch's line mode does: each
    distinct token becomes one character, the short strings are diffed, then mapped back."""
    table: dict[str, str] = {}
    back: dict[str, str] = {}

    def encode(parts: list[str]) -> str:
        out = []
        for part in parts:
            char = table.get(part)
            if char is None:
                n = len(table) + 1
                # Skip the surrogate range: those code points cannot stand alone in a str.
                char = chr(n if n < 0xD800 else n + 0x800)
                table[part] = char
                back[char] = part
            out.append(char)
        return "".join(out)

    chars_a, chars_b = encode(a), encode(b)
    raw = fast_diff_match_patch.diff(
        chars_a, chars_b, timelimit=0, checklines=False, cleanup="Semantic", counts_only=False
    )
    return [(_OPS[op], [back[c] for c in text]) for op, text in raw if text]


def make(old: str, new: str) -> str:
    """The delta that turns `old` into `new`."""
    return _dmp.diff_toDelta(diff(old, new))


def apply(old: str, delta: str) -> str:
    """Rebuild the new text from `old` and a delta made by `make`; raises ValueError if the
    delta does not fit `old` (the caller still checks the hash: a wrong base of the same
    length passes here)."""
    return "".join(text for op, text in _dmp.diff_fromDelta(old, delta) if op != -1)


def apply_chain(base: str, deltas: list[str]) -> str:
    """Apply successive deltas, exactly as repeated `diff_fromDelta` would.

    The delta format counts UTF-16 code units; `diff_fromDelta` re-encodes the whole text to
    UTF-16 and decodes every piece on each call. Staying in UTF-16 across the chain and
    decoding once makes a K-delta replay several times cheaper. The tests check it against
    `diff_fromDelta` on every delta they make, and replay checks the SHA-256 of the result.
    """
    if not deltas:
        return base
    buffer = base.encode("utf-16-be")
    for text in deltas:
        pieces = []
        pointer = 0
        for token in text.split("\t"):
            if not token:
                continue
            op, param = token[0], token[1:]
            if op == "+":
                pieces.append(unquote(param).encode("utf-16-be"))
                continue
            if op not in "=-":
                raise ValueError(f"invalid diff operation in delta: {op!r}")
            count = int(param)
            if count < 0:
                raise ValueError(f"negative number in delta: {param!r}")
            if op == "=":
                pieces.append(buffer[pointer : pointer + 2 * count])
            pointer += 2 * count
        if pointer != len(buffer):
            raise ValueError(
                f"delta length ({pointer // 2}) does not equal source length ({len(buffer) // 2})"
            )
        buffer = b"".join(pieces)
    return buffer.decode("utf-16-be")
