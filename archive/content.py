"""Content as bytes: its SHA-256, whether it is UTF-8 text, and compression of stored blobs.

Documents are bytes. Only content that decodes as strict UTF-8 is treated as text (and gets
deltas); decoding and re-encoding valid UTF-8 is lossless, so BOMs, CRLF, NFC/NFD and non-BMP
characters come back byte-identical.
"""

from __future__ import annotations

import hashlib
import zlib

# Codecs of a stored blob (the `codec` column): what to undo to get the payload back.
RAW = 0
ZLIB = 1

_LEVEL = 9


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def as_text(data: bytes) -> str | None:
    """The text of `data` if it is valid UTF-8, else None (binary)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def pack(payload: bytes) -> tuple[int, bytes]:
    """Compress only when compression shrinks: small deltas grow under zlib."""
    if len(payload) > 64:
        packed = zlib.compress(payload, _LEVEL)
        if len(packed) < len(payload):
            return ZLIB, packed
    return RAW, payload


def unpack(codec: int, blob: bytes) -> bytes:
    if codec == RAW:
        return bytes(blob)
    if codec == ZLIB:
        return zlib.decompress(blob)
    raise ValueError(f"unknown codec {codec}")
