"""The event: one immutable fact about one document, and its place in a hash chain.

Times are integer microseconds since the Unix epoch, UTC, so that both engines store and
compare them the same way and the canonical form has no time-zone ambiguity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

CREATED = "created"
MODIFIED = "modified"
DELETED = "deleted"
RENAMED = "renamed"
TYPES = (CREATED, MODIFIED, DELETED, RENAMED)
TYPE_CODES = {name: code for code, name in enumerate(TYPES)}  # stored as a small integer

GENESIS = bytes(32)  # the "previous hash" of a document's first event


@dataclass(frozen=True, slots=True)
class Event:
    position: int
    doc_id: int
    seq: int
    type: str
    key: str
    sha256: bytes | None
    size: int
    recorded_at: int
    effective_at: int
    event_hash: bytes
    meta: dict[str, Any] | None = field(default=None)
    content_id: int | None = field(default=None, compare=False)  # storage detail, not hashed

    @property
    def has_content(self) -> bool:
        return self.type != DELETED


def canonical(
    *,
    position: int,
    doc_id: int,
    seq: int,
    type: str,
    key: str,
    sha256: bytes | None,
    size: int,
    recorded_at: int,
    effective_at: int,
    meta: dict[str, Any] | None,
) -> bytes:
    """The bytes an event hash covers: every field but the hash itself, in a fixed form."""
    body = {
        "position": position,
        "doc": doc_id,
        "seq": seq,
        "type": type,
        "key": key,
        "sha256": sha256.hex() if sha256 is not None else None,
        "size": size,
        "recorded_at": recorded_at,
        "effective_at": effective_at,
        "meta": meta,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(previous: bytes, canonical_bytes: bytes) -> bytes:
    """event_hash = SHA-256(previous event's hash ‖ canonical fields)."""
    return hashlib.sha256(previous + canonical_bytes).digest()


def hash_event(previous: bytes, **fields: Any) -> bytes:
    return chain_hash(previous, canonical(**fields))
