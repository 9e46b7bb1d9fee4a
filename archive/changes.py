"""What changed between two versions, for people: summaries for `history`, and the word,
unified and JSON renderings of `diff`. All diffs come from diff-match-patch (archive.delta)."""

from __future__ import annotations

import re
from typing import Any

from . import content, delta

_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


def word_diff(old: str, new: str) -> list[tuple[int, str]]:
    """A word-level diff: whole words, runs of white space and punctuation as units."""
    diffs = delta.tokens_diff(_TOKEN.findall(old), _TOKEN.findall(new))
    return _merge(_factor(_merge([(op, "".join(parts)) for op, parts in diffs])))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _factor(diffs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Move text shared by the ends of a replaced pair out of it ("\n" -> "\n\nUpdate"
    becomes an insertion of "\nUpdate"), so a white-space run that grew reads as growth."""
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(diffs):
        if i + 1 < len(diffs) and {diffs[i][0], diffs[i + 1][0]} == {-1, 1}:
            gone = diffs[i][1] if diffs[i][0] == -1 else diffs[i + 1][1]
            came = diffs[i][1] if diffs[i][0] == 1 else diffs[i + 1][1]
            head = _common_prefix(gone, came)
            tail = _common_prefix(gone[head:][::-1], came[head:][::-1])
            out.append((0, gone[:head]))
            out.append((-1, gone[head : len(gone) - tail]))
            out.append((1, came[head : len(came) - tail]))
            out.append((0, gone[len(gone) - tail :]))
            i += 2
        else:
            out.append(diffs[i])
            i += 1
    return out


def line_diff(old: str, new: str) -> list[tuple[int, list[str]]]:
    """A line-level diff, each entry the lines of one operation."""
    return delta.tokens_diff(old.splitlines(keepends=True), new.splitlines(keepends=True))


def _merge(diffs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    merged: list[tuple[int, str]] = []
    for op, text in diffs:
        if not text:
            continue
        if merged and merged[-1][0] == op:
            merged[-1] = (op, merged[-1][1] + text)
        else:
            merged.append((op, text))
    return merged


def summarize(old: bytes | None, new: bytes | None) -> dict[str, Any]:
    """Characters added and removed, and whether the change only appended at the end."""
    if new is None:
        return {"kind": "deleted", "added": 0, "removed": 0}
    new_text = content.as_text(new)
    old_text = content.as_text(old) if old is not None else ""
    if new_text is None or old_text is None:
        return {"kind": "binary", "added": len(new), "removed": len(old or b"")}
    if old is None:
        return {"kind": "initial", "added": len(new_text), "removed": 0}
    diffs = delta.diff(old_text, new_text)
    added = sum(len(t) for op, t in diffs if op == 1)
    removed = sum(len(t) for op, t in diffs if op == -1)
    ops = [op for op, t in diffs if t]
    if ops in ([0, 1], [1]) and removed == 0:
        kind = "appended"
    elif not ops or ops == [0]:
        kind = "same"
    else:
        kind = "edited"
    return {"kind": kind, "added": added, "removed": removed}


GREEN, RED, RESET = "\x1b[32m", "\x1b[31;9m", "\x1b[0m"


def _elide(text: str, *, first: bool, last: bool, context: int) -> str:
    """Shorten unchanged text to `context` lines on each side that touches a change."""
    lines = text.split("\n")
    keep_head = 0 if first else context + 1
    keep_tail = 0 if last else context + 1
    if len(lines) <= keep_head + keep_tail + 1:
        return text
    hidden = len(lines) - keep_head - keep_tail
    marker = f"\u22ef {hidden} unchanged line{'s' if hidden != 1 else ''} \u22ef"
    parts = lines[:keep_head] + [marker] + (lines[len(lines) - keep_tail :] if keep_tail else [])
    return "\n".join(parts) + ("" if keep_tail else "\n")


def render_words(
    diffs: list[tuple[int, str]], *, color: bool, context: int | None = 2
) -> str:
    """Inline word diff; unchanged stretches are cut to `context` lines (None: keep all)."""
    out = []
    for i, (op, text) in enumerate(diffs):
        if op == 0:
            if context is not None:
                text = _elide(text, first=i == 0, last=i == len(diffs) - 1, context=context)
            out.append(text)
        elif color:
            out.append((GREEN if op == 1 else RED) + text + RESET)
        else:
            out.append(("{+" + text + "+}") if op == 1 else ("[-" + text + "-]"))
    return "".join(out)


def render_unified(old: str, new: str, label_a: str, label_b: str, context: int = 3) -> str:
    """A unified diff (as `diff -u` prints) built from a diff-match-patch line diff."""
    lines: list[tuple[str, str]] = []  # (' ', '-', '+'), line
    for op, chunk in line_diff(old, new):
        mark = {0: " ", -1: "-", 1: "+"}[op]
        lines += [(mark, line) for line in chunk]
    changed = [i for i, (mark, _) in enumerate(lines) if mark != " "]
    if not changed:
        return ""
    hunks: list[tuple[int, int]] = []
    for i in changed:
        lo, hi = max(0, i - context), min(len(lines), i + context + 1)
        if hunks and lo <= hunks[-1][1]:
            hunks[-1] = (hunks[-1][0], max(hi, hunks[-1][1]))
        else:
            hunks.append((lo, hi))
    out = [f"--- {label_a}\n", f"+++ {label_b}\n"]
    for lo, hi in hunks:
        a_start = sum(1 for m, _ in lines[:lo] if m != "+")
        b_start = sum(1 for m, _ in lines[:lo] if m != "-")
        a_len = sum(1 for m, _ in lines[lo:hi] if m != "+")
        b_len = sum(1 for m, _ in lines[lo:hi] if m != "-")
        out.append(
            f"@@ -{a_start + (1 if a_len else 0)},{a_len} +{b_start + (1 if b_len else 0)},"
            f"{b_len} @@\n"
        )
        for mark, line in lines[lo:hi]:
            tail = "" if line.endswith("\n") else "\n\\ No newline at end of file\n"
            out.append(mark + line + tail)
    return "".join(out)


def describe(versions: list[Any]) -> list[dict[str, Any]]:
    """History rows: each event with what changed against the version before it (by
    sequence), and the earlier version it reverts to when its content comes back."""
    rows = []
    seen: dict[bytes, int] = {}  # content hash -> last version number that had it
    previous: bytes | None = None
    previous_sha: bytes | None = None
    for snap in versions:
        ev = snap.event
        data = snap.data if ev.sha256 is not None else None
        change = summarize(previous, data)
        if ev.type == "renamed":
            origin = (ev.meta or {}).get("from")
            change = {"kind": "renamed", "added": 0, "removed": 0, "from": origin}
        reverts_to = None
        if ev.sha256 is not None and ev.sha256 != previous_sha and ev.sha256 in seen:
            reverts_to = seen[ev.sha256]
        rows.append({"event": ev, "change": change, "reverts_to": reverts_to})
        if ev.sha256 is not None:
            seen[ev.sha256] = ev.seq
            previous = data
        previous_sha = ev.sha256
    return rows
