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

# Above this many code points on both sides, diff line by line first: bounded cost on big
# files, decided by size alone so that the same inputs always give the same delta.
LINE_MODE_ABOVE = 200_000


def diff(old: str, new: str) -> list[tuple[int, str]]:
    """diff-match-patch diff tuples (-1, 0, 1) from `old` to `new`."""
    checklines = len(old) > LINE_MODE_ABOVE and len(new) > LINE_MODE_ABOVE
    raw = fast_diff_match_patch.diff(
        old, new, timelimit=0, checklines=checklines, cleanup="No", counts_only=False
    )
    return [(_OPS[op], text) for op, text in raw]


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
