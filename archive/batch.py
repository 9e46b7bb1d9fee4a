"""`archive show --batch`: many point-in-time reads over one process, for scripts.

In the spirit of `git cat-file --batch`: each input line is `DOC<TAB>TIME` (TIME may be
empty: now; the last tab ends DOC, so a key may hold tabs); each answer is a header
`<sha256> <size> <key>`, the exact bytes and a newline, or `<key> missing` when the document
did not exist then. Answers come in input order.

Lines are answered as they arrive, in groups: every complete line already waiting on the
input is read (up to GROUP lines: the more of a document's versions a group holds, the more
of them are rebuilt from each other rather than from their keyframes), the group is resolved
in (document, time) order and its contents rebuilt in bulk (one chain query per 500), so that
each replay starts from the version just rebuilt; its answers are written in input order and
flushed before the next read could block. A co-process that sends one line and waits gets
its answer at once; a script that pipes many lines gets them answered without a flush per line.
"""

from __future__ import annotations

import os
from contextlib import suppress
from typing import TYPE_CHECKING, Any, BinaryIO

from . import timeparse
from .errors import ArchiveError, BadInput

if TYPE_CHECKING:
    from .api import Archive, Reader

GROUP = 4096  # lines resolved together at most
HELD = 64 << 20  # bytes of answers held between resolving a group and writing it, at most
CHUNK = 1 << 16  # bytes read from the input at a time
_AGAIN = object()  # an answer not held: read again when written


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


def _parse(lines: list[bytes], before: int) -> tuple[list, BadInput | None]:
    """(key, time) per non-empty line, up to the first line that is not understood."""
    requests: list[tuple[str, int | None]] = []
    for number, raw in enumerate(lines, start=before + 1):
        try:
            line = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            return requests, BadInput(f"line {number}: not UTF-8")
        if not line:
            continue
        key, tab, when = line.rpartition("\t")  # the last tab: a key may hold tabs
        if not tab:
            key, when = line, ""
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
        lines = list(source)
        for start in range(0, len(lines), GROUP):
            yield lines[start : start + GROUP]
        return
    pending = b""
    ended = False
    while not ended:
        chunk = os.read(fd, CHUNK)  # blocks only when nothing is waiting
        ended = not chunk
        pending += chunk
        # Then all that is already waiting, up to a group: one read holds about 1,400 lines,
        # and a group of GROUP rebuilds a document's versions from each other more often.
        while not ended and pending.count(b"\n") < GROUP and _waiting(fd):
            chunk = os.read(fd, CHUNK)
            ended = not chunk
            pending += chunk
        *lines, pending = pending.split(b"\n")
        for start in range(0, len(lines), GROUP):
            yield lines[start : start + GROUP]
    if pending:
        yield [pending]


def _waiting(fd: int) -> bool:
    """Whether reading `fd` would not block (a pipe with data, a file); False where the
    system cannot tell, so that nothing waits on a line that is not there."""
    if os.name != "posix":
        return False
    import select

    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _answer(reader: Reader, requests: list[tuple[str, int | None]], sink: BinaryIO) -> int:
    """Resolve in (document, time) order, write in input order. The group's versions are
    found first and their contents rebuilt in bulk (`Reader.prefetch`), as many at a time as
    the prefetch may hold, each round's answers taken before the next round is rebuilt.
    Answers held in between are bounded (HELD bytes; past that a request is read again when
    its turn comes, from the cache). A request that fails ends the run after the answers to
    those before it."""
    found: dict[tuple[str, int | None], Any] = {}
    events: dict[tuple[str, int | None], Any] = {}
    for request in sorted(set(requests), key=_order):
        try:
            events[request] = reader.resolve(*request)
        except ArchiveError as error:
            found[request] = error
    held = 0
    for round_ in _rounds(list(events.items()), reader.prefetch_room):
        # A failed bulk rebuild leaves each answer to its own read, which reports the
        # error, if there is one, in its turn.
        with suppress(ArchiveError):
            reader.prefetch(ev for _request, ev in round_ if ev is not None)
        for request, event in round_:
            try:
                snap = reader.snapshot(event) if event is not None else None
            except ArchiveError as error:
                found[request] = error
                continue
            if snap is not None and held + len(snap.data) > HELD:
                snap = _AGAIN
            elif snap is not None:
                held += len(snap.data)
            found[request] = snap
    out: list[bytes] = []  # written together: one call per group, not three per answer
    for key, at in requests:
        snap = found[(key, at)]
        if snap is _AGAIN:
            sink.writelines(out)
            out.clear()
            snap = reader.at(key, at)
        elif isinstance(snap, ArchiveError):
            sink.writelines(out)
            sink.flush()
            raise snap
        if snap is None:
            out.append(f"{key} missing\n".encode())
        else:
            header = f"{snap.event.sha256.hex()} {len(snap.data)} {key}\n"
            out += (header.encode(), snap.data, b"\n")
    sink.writelines(out)
    return len(requests)


def _rounds(items: list[tuple[Any, Any]], room: int):
    """Consecutive runs of (request, event) whose versions' sizes fit in `room` bytes (each
    at least one): a run is rebuilt in bulk, each version from the one before it. Rebuilding
    only as much as fits left the rest to a chain query each (chain's 5,000 reads: 920)."""
    start, used = 0, 0
    for n, (_request, event) in enumerate(items):
        size = event.size if event is not None else 0
        if n > start and used + size > room:
            yield items[start:n]
            start, used = n, 0
        used += size
    if start < len(items):
        yield items[start:]


def _order(request: tuple[str, int | None]) -> tuple[str, int]:
    key, at = request
    return key, at if at is not None else timeparse.LATEST
