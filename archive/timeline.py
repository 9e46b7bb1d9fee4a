"""Timelines: earlier versions of real documents, cut from their own text, with the times
they were current. The demo and the tests replay `seeds/timeline.json` through the archive."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput


@dataclass(frozen=True, slots=True)
class Step:
    at: str
    key: str
    data: bytes


def load(path: str | Path) -> list[Step]:
    """The versions a timeline file describes, in timeline order."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BadInput(f"cannot read timeline {path}: {error}") from None
    steps = []
    for step in spec["steps"]:
        source = (path.parent / step["doc"]).read_bytes()
        lines = source.splitlines(keepends=True)
        if "lines" in step:
            data = b"".join(b"".join(lines[a - 1 : b]) for a, b in step["lines"])
        else:
            data = source
        steps.append(Step(step["at"], step["doc"], data))
    return steps
