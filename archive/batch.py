"""`archive show --batch`: many point-in-time reads over one process, for scripts.

In the spirit of `git cat-file --batch`: each input line is `DOC<TAB>TIME` (TIME may be
empty: now); each answer is a header `<sha256> <size> <key>`, the exact bytes and a newline,
or `<key> missing` when the document did not exist then. Answers come in input order.

Lines are answered as they arrive, in groups: every complete line already waiting on the
input is read, the group is resolved in (document, time) order, so that each replay starts
from the version just rebuilt, and its answers are written in input order and flushed before
the next read could block. A co-process that sends one line and waits gets its answer at
once; a script that pipes many lines gets them answered without a flush per line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, BinaryIO

from . import timeparse
from .errors import BadInput

if TYPE_CHECKING:
    from .api import Archive, Reader

GROUP = 512  # lines resolved together at most (their answers are held until written)
CHUNK = 1 << 16  # bytes read from the input at a time


def serve(arc: Archive, source: BinaryIO, sink: BinaryIO, *, known_at: int | None) -> int:
    """Answer every request line; returns the number answered. A line that cannot be read
    ends the run with BadInput naming it, after the answers to the lines before it."""
    answered = number = 0
    with arc.reader(known_at=known_at) as reader:
        for group in _groups(source):
            requests, error = _parse(group, number)
            number += len(group)
            answered += _answer(reader, requests, sink)
            sink.flush()
            if error is not None:
                raise error
    return answered


def _parse(lines: list[bytes], number: int) -> tuple[list, BadInput | None]:
    """(key, time) per non-empty line, up to the first line that is not understood."""
    requests: list[tuple[str, int | None]] = []
    for number, raw in enumerate(lines, start=number + 1):  # noqa: B020 - numbering on
        line = raw.rstrip(b"\r\n").decode("utf-8", errors="strict")
        if not line:
            continue
        key, _, when = line.partition("\t")
        try:
            requests.append((key, timeparse.parse(when) if when.strip() else None))
        except BadInput as error:
            return requests, BadInput(f"line {number}: {error}")
    return requests, None


def _groups(source: BinaryIO):
    """Lists of complete input lines, each list all that was waiting (at most GROUP)."""
    try:
        fd = source.fileno()
    except (AttributeError, OSError):  # not a file: an in-memory stream, read as lines
        lines = [raw for raw in source]
        for start in range(0, len(lines), GROUP):
            yield lines[start : start + GROUP]
        return
    pending = b""
    while True:
        chunk = os.read(fd, CHUNK)  # blocks only when nothing is waiting
        if not chunk:
            if pending:
                yield [pending]
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for start in range(0, len(lines), GROUP):
            yield lines[start : start + GROUP]


def _answer(reader: Reader, requests: list[tuple[str, int | None]], sink: BinaryIO) -> int:
    found = {request: reader.at(*request) for request in sorted(set(requests), key=_order)}
    for key, at in requests:
        snap = found[(key, at)]
        if snap is None:
            sink.write(f"{key} missing\n".encode())
        else:
            sink.write(f"{snap.event.sha256.hex()} {len(snap.data)} {key}\n".encode())
            sink.write(snap.data)
            sink.write(b"\n")
    return len(requests)


def _order(request: tuple[str, int | None]) -> tuple[str, int]:
    key, at = request
    return key, at if at is not None else 2**62
