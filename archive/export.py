"""Point-in-time export: the whole corpus as it stood at a moment, as a folder or a tar.

The export is built in a temporary place beside the target and moved into position only when
complete, so a reader never sees half an export and a failure leaves no partial target.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from . import timeparse
from .errors import BadInput, Damaged, StorageError

if TYPE_CHECKING:
    from .api import Archive, TimeLike
    from .events import Event

T = TypeVar("T")

MANIFEST = "MANIFEST.json"
PAGE = 500  # documents rebuilt per read: bounded memory for big corpora


def default_target(at_us: int, fmt: str) -> Path:
    stamp = timeparse.show(at_us).replace(":", "-")
    return Path("snapshots") / (stamp + (".tar" if fmt == "tar" else ""))


def export(
    arc: Archive,
    *,
    at: TimeLike,
    known_at: TimeLike | None = None,
    out: str | os.PathLike | None = None,
    format: str = "dir",
    force: bool = False,
) -> dict[str, Any]:
    """Write every document that existed at `at` at its key path, plus MANIFEST.json."""
    from .api import check_key, to_us

    if format not in ("dir", "tar"):
        raise BadInput(f"unknown export format {format!r}: use dir or tar")
    at_us, known_us = to_us(at), to_us(known_at)
    target = Path(out) if out is not None else default_target(at_us, format)
    _check_target(target, format, force)
    position, found = arc.corpus(at=at_us, known_at=known_us)
    _check_keys([ev.key for ev in found], check_key)
    manifest = {
        "at": timeparse.show(at_us),
        "known_at": timeparse.show(known_us) if known_us is not None else None,
        "position": position,
        "documents": [
            {
                "key": ev.key,
                "sha256": ev.sha256.hex() if ev.sha256 else None,
                "size": ev.size,
                "seq": ev.seq,
                "effective_at": timeparse.show(ev.effective_at),
            }
            for ev in found
        ],
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if format == "dir":
            _write_dir(arc, found, manifest, target)
        else:
            _write_tar(arc, found, manifest, target)
    except OSError as error:  # the file system refused: one line naming the target
        place = str(error.filename or "")
        where = f" ({place})" if place and f".{target.name}." not in place else ""  # not staging
        reason = f"{error.strerror or error}{where}"
        if isinstance(error, FileExistsError | NotADirectoryError):
            blocking = next((a for a in target.parents if a.exists() and not a.is_dir()), None)
            if blocking is not None:
                reason = f"{blocking} is a file, not a folder"
        raise BadInput(f"cannot write export to {target}: {reason}") from None
    return {**manifest, "out": str(target)}


def _check_target(target: Path, fmt: str, force: bool) -> None:
    try:
        exists = target.exists()
        if fmt == "dir":
            if exists and not target.is_dir():
                raise BadInput(f"export target {target} exists and is not a folder")
            if exists and any(target.iterdir()) and not force:
                raise BadInput(f"export target {target} is not empty (use --force to replace it)")
            if exists and Path.cwd().resolve().is_relative_to(target.resolve()):
                raise BadInput(f"export target {target} holds the current folder: not replaced")
        elif exists:
            if target.is_dir():
                raise BadInput(f"export target {target} is a folder; a tar export needs a file")
            if not target.is_file():  # a FIFO, a device, a socket: never replaced by a file
                raise BadInput(f"export target {target} is not a regular file: not replaced")
            if not force:
                raise BadInput(f"export target {target} exists (use --force to replace it)")
    except OSError as error:
        raise BadInput(f"cannot use export target {target}: {error.strerror or error}") from None


def _check_keys(keys: list[str], check_key) -> None:
    seen = set(keys)
    if len(seen) != len(keys):
        raise BadInput("two documents share a key at that time; cannot export")
    for key in keys:
        check_key(key)
        if key == MANIFEST:
            raise BadInput(f"a document is named {MANIFEST}, which the export reserves")
        parts = key.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in seen:
                raise BadInput(f"{key!r} needs a folder where a document stands")


def _pages(arc: Archive, found: list[Event]):
    """Each document's verified bytes, of the size its event (and so the manifest, and a
    tar's layout) says: an event whose size is not its content's is damage."""
    for start in range(0, len(found), PAGE):
        page = found[start : start + PAGE]
        data = arc.read_contents([ev.content_id for ev in page])
        for ev in page:
            content = data[ev.content_id]
            if len(content) != ev.size:
                raise Damaged(
                    f"event {ev.position} ({ev.key}) says {ev.size} bytes, its content has "
                    f"{len(content)}: run archive verify"
                )
            yield ev, content


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Indented JSON with one document per line: readable, and written by the C encoder
    (json's indenting encoder is pure Python, seconds for a large corpus)."""
    head = {k: v for k, v in manifest.items() if k != "documents"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    docs = [json.dumps(d, ensure_ascii=False) for d in manifest["documents"]]
    body = ',\n'.join(f"    {d}" for d in docs)
    text = "{\n" + "\n".join(lines) + '\n  "documents": [' + (f"\n{body}\n  " if docs else "")
    return (text + "]\n}\n").encode("utf-8")


def _write_dir(arc: Archive, found: list[Event], manifest: dict, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _halved(arc, found, here=lambda docs: _write_files(arc, docs, staging))
        (staging / MANIFEST).write_bytes(_manifest_bytes(manifest))
        staging.chmod(0o755)
        if target.exists():
            _replace_dir(staging, target)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_files(arc: Archive, found: list[Event], staging: Path) -> None:
    folders = {str(staging)}
    for ev, data in _pages(arc, found):
        folder, _, name = f"{staging}/{ev.key}".rpartition("/")
        if folder not in folders:
            os.makedirs(folder, exist_ok=True)  # the helper may make it at the same time
            folders.add(folder)
        _write_file(f"{folder}/{name}", data, ev.effective_at * 1000)


# An export of this many documents or more is written by two processes, each half the
# documents: rebuilding contents is Python and holds the GIL, and creating a file is a few
# system calls (30 to 850 us each on these machines), so threads would wait for each other.
# On the wide workload's 10,000 documents the export took 2.1 s in one process.
FORK_FROM = 2000


def _halved(
    arc: Archive,
    found: list[Event],
    *,
    here: Callable[[list[Event]], T],
    there: Callable[[list[Event]], object] | None = None,
) -> tuple[T, bool]:
    """`here` on the documents, or from FORK_FROM of them `here` on the first half and
    `there` (default: `here`) on the second in a helper process, both at once; `here`'s
    result, and whether the work was shared. An error of either side is raised, after the
    helper has ended."""
    there = there or here
    helper = None
    if len(found) >= FORK_FROM and _can_fork():
        half = len(found) // 2
        helper = _Helper.start(arc, lambda rest=found[half:]: there(rest))
        if helper is not None:
            found = found[:half]
    try:
        result = here(found)
    except BaseException:
        if helper is not None:
            helper.finish(kill=True)
        raise
    if helper is not None:
        helper.finish()  # raises the helper's error, if it had one
    return result, helper is not None


def _can_fork() -> bool:
    """Only a process with one thread forks: a child of a threaded one could inherit a lock
    that another thread held at that moment, held for ever (the command line has one)."""
    import threading

    return hasattr(os, "fork") and (os.cpu_count() or 1) > 1 and threading.active_count() == 1


class _Helper:
    """A forked child running `work` on `arc`; `finish` waits for it and raises what it
    raised. The child opens connections of its own (`Store.after_fork`)."""

    @classmethod
    def start(cls, arc: Archive, work: Callable[[], None]) -> _Helper | None:
        """The helper, or None where the system refuses a process (the caller then does
        all the work itself)."""
        try:
            return cls(arc, work)
        except OSError:
            return None

    def __init__(self, arc: Archive, work: Callable[[], None]):
        self.reader, writer = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            os.close(self.reader)
            os.close(writer)
            raise
        if self.pid == 0:  # the child: never returns
            code = 0
            try:
                os.close(self.reader)
                arc.store.after_fork()
                work()
            except BaseException as error:
                code = 1
                with open(writer, "wb", closefd=False) as out:
                    out.write(_pickled(error))
            finally:
                os._exit(code)
        os.close(writer)

    def finish(self, *, kill: bool = False) -> None:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with os.fdopen(self.reader, "rb") as pipe:
            message = pipe.read()
        _pid, status = os.waitpid(self.pid, 0)
        if kill:
            return
        if message:
            raise pickle.loads(message)
        if status != 0:
            raise OSError(f"the export's helper process ended with status {status}")


def _pickled(error: BaseException) -> bytes:
    try:
        return pickle.dumps(error)
    except Exception:  # an error that cannot be pickled still says what it was
        return pickle.dumps(OSError(f"{type(error).__name__}: {error}"))


def _replace_dir(staging: Path, target: Path) -> None:
    """Put the new export where the old one is, the old one out of the way first (two
    renames: a folder cannot be renamed over a non-empty one). If the second rename fails,
    the old export goes back; nothing is left beside the target either way."""
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    try:
        os.rename(target, old / "x")
    except OSError:
        old.rmdir()
        raise
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old / "x", target)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_file(path: str, data: bytes, mtime_ns: int) -> None:
    """One exported file, at the level of the operating system (a corpus is many files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)


def _write_tar(arc: Archive, found: list[Event], manifest: dict, target: Path) -> None:
    """The same bytes as tarfile's PAX format writes (tested), member by member: tarfile's
    TarFile copies each TarInfo, streams the data through a file object and keeps every
    member; with its pure-Python headers that was a quarter of a 10,000-document export.
    From FORK_FROM documents a helper writes the members of the second half into the same
    file, from where the first half ends: a member's size follows from its event (name,
    size, time), so the place is known before any content is read."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            (written, mine), halved = _halved(
                arc,
                found,
                here=lambda docs: (_members(arc, docs, raw), len(docs)),
                there=lambda docs: _write_from(
                    arc, docs, name, _size(found[: len(found) - len(docs)])
                ),
            )
            if halved:
                # The helper began where it computed the first half ends: if this half wrote
                # more or less, the file is not this half plus the helper's.
                written += _size(found[mine:])
                raw.flush()
                if os.fstat(raw.fileno()).st_size != written:
                    raise StorageError("the two halves of the tar export do not meet")
                raw.seek(written)
            now = int(timeparse.now_us() // 1_000_000)
            written += _member(raw, MANIFEST, _manifest_bytes(manifest), now)
            end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record
            end += -(written + end) % tarfile.RECORDSIZE
            raw.write(bytes(end))
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(name, 0o644)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _members(arc: Archive, found: list[Event], raw: BinaryIO) -> int:
    written = 0
    for ev, data in _pages(arc, found):
        written += _member(raw, ev.key, data, ev.effective_at // 1_000_000)
    return written


def _write_from(arc: Archive, found: list[Event], name: str, offset: int) -> None:
    """The helper's members, written into the export's file from `offset` on."""
    with open(name, "r+b") as raw:
        raw.seek(offset)
        _members(arc, found, raw)


def _size(found: list[Event]) -> int:
    """The bytes the members of these documents take, headers and padding included."""
    total = 0
    for ev in found:
        mtime = ev.effective_at // 1_000_000
        fits = _ustar_fits(ev.key, ev.size, mtime)
        header = tarfile.BLOCKSIZE if fits else len(_header(ev.key, ev.size, mtime))
        total += header + ev.size + -ev.size % tarfile.BLOCKSIZE
    return total


def _member(raw: BinaryIO, name: str, data: bytes, mtime: int) -> int:
    """Write one regular file (mode 0644) into a tar stream; returns the bytes written."""
    header = _header(name, len(data), mtime)
    raw.write(header)
    raw.write(data)
    padding = -len(data) % tarfile.BLOCKSIZE
    raw.write(bytes(padding))
    return len(header) + len(data) + padding


_USTAR_IDS = b"0000644\x000000000\x000000000\x00"  # mode 0644, uid 0, gid 0
# checksum (spaces while summing), type "0", no link name, "ustar\x0000", no user, group,
# device numbers or prefix, and the block's padding
_USTAR_REST = b" " * 8 + b"0" + bytes(100) + tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)


def _header(name: str, size: int, mtime: int) -> bytes:
    """A regular file's header: one ustar block, or a pax extended header and then the
    block, for a name or number that ustar cannot hold."""
    header = _ustar_header(name, size, mtime)
    if header is None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, mtime
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header


def _ustar_fits(name: str, size: int, mtime: int) -> bool:
    return len(name) <= 100 and name.isascii() and 0 <= size < 8**11 and 0 <= mtime < 8**11


def _ustar_header(name: str, size: int, mtime: int) -> bytes | None:
    """The header block tarfile's PAX format writes for a regular file whose name is ASCII
    and fits, or None (then tarfile's own TarInfo.tobuf writes it)."""
    if not _ustar_fits(name, size, mtime):
        return None
    block = b"%s%s%011o\x00%011o\x00%s" % (
        name.encode("ascii").ljust(100, b"\x00"), _USTAR_IDS, size, mtime, _USTAR_REST
    )
    return block[:148] + b"%06o\x00" % sum(block) + block[155:]
