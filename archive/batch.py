"""`archive show --batch`: many point-in-time reads over one process, for scripts.

In the spirit of `git cat-file --batch`: each input line is `DOC<TAB>TIME` (TIME may be
empty: now); each answer is a header `<sha256> <size> <key>`, the exact bytes and a newline,
or `<key> missing` when the document did not exist then. Output is flushed after every answer
so a script can use it as a co-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from . import timeparse
from .errors import BadInput

if TYPE_CHECKING:
    from .api import Archive


def serve(arc: Archive, source: BinaryIO, sink: BinaryIO, *, known_at: int | None) -> int:
    """Answer every request line; returns the number answered."""
    answered = 0
    with arc.reader(known_at=known_at) as reader:
        for number, raw in enumerate(source, start=1):
            line = raw.rstrip(b"\r\n").decode("utf-8", errors="strict")
            if not line:
                continue
            key, _, when = line.partition("\t")
            try:
                at = timeparse.parse(when) if when.strip() else None
            except BadInput as error:
                raise BadInput(f"line {number}: {error}") from None
            snap = reader.at(key, at)
            if snap is None:
                sink.write(f"{key} missing\n".encode())
            else:
                sink.write(f"{snap.event.sha256.hex()} {len(snap.data)} {key}\n".encode())
                sink.write(snap.data)
                sink.write(b"\n")
            sink.flush()
            answered += 1
    return answered
