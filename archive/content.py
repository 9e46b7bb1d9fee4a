"""Content as bytes: its SHA-256, whether it is UTF-8 text, and compression of stored blobs.

Documents are bytes. Only content that decodes as strict UTF-8 is treated as text (and gets
deltas); decoding and re-encoding valid UTF-8 is lossless, so BOMs, CRLF, NFC/NFD and non-BMP
characters come back byte-identical.
"""

from __future__ import annotations

import hashlib
import threading
import zlib

# Codecs of a stored blob (the `codec` column): what to undo to get the payload back.
RAW = 0
ZLIB = 1
ZSTD = 2
# A delta's payload compressed by zstd with its base's bytes as a raw-content dictionary: the
# inserted text of a rewrite is mostly text moved or copied from the base (diff-match-patch
# can only delete and insert), and zstd then stores it as references into the base. On the
# real history this took 78 KB off its 463 KB of deltas.
ZSTD_BASE = 3

_LEVEL = 9
# Payloads above this (keyframes, the deltas of rewrites) are compressed with zstd: on the chain
# document's keyframes, level 9 is 2 % smaller than zlib's level 9, compresses twice as fast
# and inflates 3.4 times as fast (21 µs against 73 for 20 KB), which is most of a cold read.
# Smaller payloads stay zlib (with a small window) or raw: zstd's frame makes them larger.
ZSTD_FROM = 4096
# Payloads up to this stay raw. zlib takes a quarter off a 200-byte delta, but inflating
# it costs about 3 us, as much as applying it, and a cold read applies up to K of them.
ZLIB_FROM = 256
_ZSTD_LEVEL = 9
_ZSTD_LEVEL_LARGE = 3  # above DELTA_UP_TO: 100 MB at level 3 took 0.4 s, about zlib 9's size


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# Contents larger than this are stored whole (keyframes), never as deltas: a diff holds several
# copies of both texts at once, and a keyframe of a file that large costs little beside it.
# Decided by size alone, so the same inputs are always stored alike.
DELTA_UP_TO = 16 << 20


def is_text(data: bytes) -> bool:
    """Whether `data` is valid UTF-8 (ASCII is checked without decoding)."""
    return data.isascii() or as_text(data) is not None


def as_text(data: bytes) -> str | None:
    """The text of `data` if it is valid UTF-8, else None (binary)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def pack(payload: bytes, base: bytes | None = None) -> tuple[int, bytes]:
    """Compress only when compression shrinks: small deltas grow under zlib. Decided by the
    payload (and the base a delta's payload is given with) alone, so the same payload is
    always stored alike."""
    if len(payload) > ZSTD_FROM:
        # Against a base under a quarter of the payload the dictionary cannot supply much, and
        # zstd with a dictionary came out up to 28 % larger than without (a 342 KB page
        # inserted on a 150-byte stub): such payloads are compressed alone.
        if base is not None and len(base) * 4 >= len(payload):
            packed = _zstd_with_base(base).compress(payload)
            if len(packed) < len(payload):
                return ZSTD_BASE, packed
            return RAW, payload
        level = _ZSTD_LEVEL if len(payload) <= DELTA_UP_TO else _ZSTD_LEVEL_LARGE
        packed = _zstd_codec(level).compress(payload)
        if len(packed) < len(payload):
            return ZSTD, packed
    elif len(payload) > ZLIB_FROM:
        packed = _deflate(payload, _LEVEL)
        if len(packed) < len(payload):
            return ZLIB, packed
    return RAW, payload


def _deflate(payload: bytes, level: int) -> bytes:
    """zlib data with a window no larger than the payload (at most ZSTD_FROM bytes):
    zlib.compress sets up a 32 KB window and its hash tables for every call, which cost 15
    times the compression of a 200-byte delta. Any zlib inflater reads it (the window size is
    in its header)."""
    bits = max(9, (len(payload) - 1).bit_length())
    packer = zlib.compressobj(level, zlib.DEFLATED, bits, min(9, bits - 5))
    return packer.compress(payload) + packer.flush()


def unpack(codec: int, blob: bytes, base: bytes | None = None) -> bytes:
    """The payload of a stored blob; a ZSTD_BASE blob needs the bytes of its base."""
    if codec == RAW:
        return bytes(blob)
    if codec == ZLIB:
        return zlib.decompress(blob)
    if codec in (ZSTD, ZSTD_BASE):
        import zstandard

        if codec == ZSTD_BASE and base is None:
            raise ValueError("a delta compressed against its base needs the base")
        unpacker = _zstd_codec(None) if codec == ZSTD else _zstd_with_base(base, unpack=True)
        try:  # the frame carries the payload's size: the output is allocated once
            return unpacker.decompress(blob)
        except (zstandard.ZstdError, MemoryError) as error:  # a damaged size asks for exabytes
            raise ValueError(f"zstd: {error or 'declared size cannot be allocated'}") from None
    raise ValueError(f"unknown codec {codec}")


def _zstd_with_base(base: bytes, *, unpack: bool = False):
    """A zstd compressor (level 9) or decompressor whose dictionary is `base` as raw content.
    Made per call: the dictionary is a different base each time."""
    import zstandard

    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    if unpack:
        return zstandard.ZstdDecompressor(dict_data=dictionary)
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, dict_data=dictionary, write_checksum=False)


_codecs = threading.local()


def _zstd_codec(level: int | None):
    """This thread's zstd decompressor (level None) or compressor at `level`, made once:
    making a new one for each call cost half the inflation of a 12 KB keyframe (18.7 us
    against 8.7) and a tenth of a compression. The same frames come out; zstandard's
    contexts may be reused, one thread at a time, hence one set per thread."""
    made = getattr(_codecs, "made", None)
    if made is None:
        made = _codecs.made = {}
    codec = made.get(level)
    if codec is None:
        import zstandard  # imported where first needed: `show` of a small delta never is

        codec = made[level] = (
            zstandard.ZstdDecompressor()
            if level is None
            else zstandard.ZstdCompressor(level=level, write_checksum=False)
        )
    return codec
