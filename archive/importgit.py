"""`archive import-git`: every version of every file in a git history, as archive events.

A "git scraping" repository (a job that commits a fetched file every few minutes) already is
a version history; this turns it into events whose `effective_at` is the commit time and whose
metadata names the commit, so `archive show DOC --at T` answers what git's history said then.

How it stays cheap: one `git log --raw -z` lists every change of the first-parent history, one
`git cat-file --batch` process reads all the blobs (a process per blob would cost milliseconds
each), and versions are recorded a few thousand per transaction through `Archive.record_many`.

Every commit that changed a file's bytes is an event, with its commit id, even one that set
the bytes already in effect at its time (a back-dated revert): the archive would otherwise
call it "unchanged" and keep no event (`Version.always`). A change of mode alone is not a
version. Versions are recorded in (commit time, commit order) order, not commit order: the
archive's rule is "the version with the greatest effective time ≤ T, ties to the later one",
real histories have commits dated before their parents (back-filled versions), and in this
order two commits of one time get their sequence numbers in commit order, so the later commit
wins the tie, as in git. A deletion of a path that did not exist at its (back-dated) time has
nothing to delete and records nothing. Renames are a deletion of the old path plus a version
of the new one (`--no-renames`), so both paths keep git's own time line, path by path.

Re-importing is idempotent: a (commit, path) that already has an event is not recorded again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .api import Version, check_key
from .errors import ArchiveError, BadInput

if TYPE_CHECKING:
    from .api import Archive

BATCH_VERSIONS = 1000  # versions per record_many transaction (and progress step)
BATCH_BYTES = 32 << 20  # ...or fewer, when their blobs add up to this many bytes
READ_CHUNK = 256  # blob ids handed to cat-file at a time

_GITLINK = "160000"  # a submodule entry: its "blob" is a commit in another repository
_ZERO = "0" * 40
_MARK = b"\x01"  # starts each commit header in the log output


@dataclass(frozen=True, slots=True)
class Change:
    """One changed path in one first-parent commit, in the order the history walk met it."""

    index: int  # position of the commit in the first-parent walk, oldest first
    commit: str
    at: int  # commit time, microseconds UTC
    path: str
    blob: str | None  # None: the path was deleted by this commit


def import_git(
    arc: Archive,
    repo: str | os.PathLike[str],
    *,
    ref: str = "HEAD",
    paths: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Record every version of every file (matching one of `paths`, fnmatch globs on the repo
    path; none: all) along the first-parent history of `ref`; returns a summary."""
    started = time.perf_counter()
    repo = str(Path(repo))
    commit_id = _resolve(repo, ref)
    changes, walked = _changes(repo, commit_id, list(paths))
    order = {sha: i for i, sha in enumerate(walked)}
    done, latest = _imported(arc, order)
    todo = [
        c
        for c in changes
        if (c.commit, c.path) not in done
        # A later commit already holds this key at this very time and wins the tie anyway.
        and latest.get((c.path, c.at), -1) <= c.index
    ]
    todo.sort(key=lambda c: (c.at, c.index))
    counts = {"created": 0, "modified": 0, "deleted": 0, "unchanged": 0, "absent": 0}
    contributed: set[str] = set()
    with _BlobReader(repo) as blobs, _Progress(progress, len(todo)) as bar:
        for batch in _batches(todo, blobs):
            for version, result in zip(batch, arc.record_many(batch), strict=True):
                counts[result.status] = counts.get(result.status, 0) + 1
                if result.event is not None:
                    contributed.add(version.meta["commit"])
            bar.advance(len(batch))
    return {
        "commits": len(contributed),
        "versions": counts["created"] + counts["modified"] + counts["deleted"],
        "deletions": counts["deleted"],
        "unchanged": counts["unchanged"] + counts["absent"],
        "seconds": round(time.perf_counter() - started, 3),
    }


# -- reading the history ------------------------------------------------------------------


def _git(repo: str, *args: str) -> list[str]:
    # Options that user configuration could otherwise change in what we parse.
    return ["git", "--no-replace-objects", "-C", repo, "-c", "log.showSignature=false", *args]


def _resolve(repo: str, ref: str) -> str:
    try:
        done = subprocess.run(
            _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"),
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        raise ArchiveError("import-git needs the `git` command, which was not found") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        if said:  # git's own reason (a dubious owner, an unreadable repository)
            raise BadInput(f"{repo}: git: {said[0]}")
        raise BadInput(f"{repo}: {ref!r} is not a commit in a git repository")
    return done.stdout.decode().strip()


def _tokens(stream: IO[bytes]) -> Iterator[bytes]:
    """NUL-separated fields of `stream`, read in large chunks."""
    rest = b""
    while chunk := stream.read(1 << 20):
        parts = (rest + chunk).split(b"\0")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _changes(repo: str, commit: str, globs: list[str]) -> tuple[list[Change], list[str]]:
    """Every matching change of the first-parent history (oldest first), and the commit ids."""
    command = _git(
        repo,
        "log",
        "--first-parent",
        "-m",  # a merge shows its diff against the first parent
        "--root",  # ...and the first commit its whole tree, whatever log.showRoot says
        "--reverse",
        "--raw",
        "-z",
        "--no-renames",
        "--no-abbrev",
        "--no-color",
        "--format=%x01%H %ct",
        commit,
        "--",
    )
    changes: list[Change] = []
    walked: list[str] = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        tokens = _tokens(proc.stdout)
        sha, at = "", 0
        for token in tokens:
            field = token.lstrip(b"\n")
            if field.startswith(_MARK):
                sha, seconds = field[1:].decode().split()
                at = int(seconds) * 1_000_000
                walked.append(sha)
                continue
            # A raw entry: ":old_mode new_mode old_blob new_blob status", then the path.
            old_mode, new_mode, old, new, status = field[1:].decode().split()
            raw_path = next(tokens)
            if old == new and status == "M":
                continue  # its mode alone changed (chmod +x): the bytes did not
            if new_mode == _GITLINK and old_mode in (_GITLINK, "000000"):
                continue  # a submodule added or moved: not a file of this repository
            if status == "D" and old_mode == _GITLINK:
                continue
            path = raw_path.decode("utf-8", "surrogateescape")
            if globs and not any(fnmatch.fnmatchcase(path, g) for g in globs):
                continue
            _check_path(path, sha)
            if status == "D" or new_mode == _GITLINK or new == _ZERO:
                changes.append(Change(len(walked) - 1, sha, at, path, None))
            else:
                changes.append(Change(len(walked) - 1, sha, at, path, new))
    finally:
        proc.stdout.close()
        error = proc.stderr.read()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise BadInput(f"git log failed in {repo}: {error.decode(errors='replace').strip()}")
    return changes, walked


def _check_path(path: str, commit: str) -> None:
    """Refuse, before recording anything, a path that cannot be an archive key."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(
            f"commit {commit[:12]}: path {path!r} is not valid UTF-8; exclude it with --path"
        ) from None
    try:
        check_key(path)
    except BadInput as error:
        raise BadInput(f"commit {commit[:12]}: {error}; exclude it with --path") from None


def _imported(
    arc: Archive, order: dict[str, int]
) -> tuple[set[tuple[str, str]], dict[tuple[str, int], int]]:
    """What earlier imports recorded: (commit, key) pairs, and per (key, time) the latest
    commit (by walk position) holding it."""
    done: set[tuple[str, str]] = set()
    latest: dict[tuple[str, int], int] = {}
    for ev in arc.log():
        commit = ev.meta.get("commit") if isinstance(ev.meta, dict) else None
        if not isinstance(commit, str):
            continue
        done.add((commit, ev.key))
        index = order.get(commit)
        if index is not None:
            spot = (ev.key, ev.effective_at)
            latest[spot] = max(latest.get(spot, -1), index)
    return done, latest


# -- reading blobs ------------------------------------------------------------------------


class _BlobReader:
    """One `git cat-file --batch` process for every blob of the import."""

    def __init__(self, repo: str):
        self.proc = subprocess.Popen(
            _git(repo, "cat-file", "--batch"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def __enter__(self) -> _BlobReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc.wait()

    def read(self, ids: Iterable[str]) -> dict[str, bytes]:
        """The bytes of each blob id. A writer thread feeds the requests so that neither
        pipe can fill up while the other side waits."""
        wanted = list(dict.fromkeys(ids))
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError, ValueError):  # git gone: reader says why
                stdin.write(b"".join(oid.encode() + b"\n" for oid in wanted))
                stdin.flush()

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        found: dict[str, bytes] = {}
        try:
            for oid in wanted:
                header = stdout.readline().split()
                if len(header) != 3 or header[1] != b"blob":
                    raise BadInput(f"git cat-file: blob {oid} is missing from the repository")
                size = int(header[2])
                data = stdout.read(size)
                stdout.read(1)  # the newline after the contents
                if len(data) != size:
                    raise BadInput(f"git cat-file: blob {oid} was cut short")
                found[oid] = data
        except BaseException:
            self.proc.kill()  # unblocks the writer if git stopped reading
            raise
        finally:
            writer.join()
        return found


def _batches(todo: list[Change], blobs: _BlobReader) -> Iterator[list[Version]]:
    """Versions in recording order, a few thousand (or a few tens of MB) at a time."""
    batch: list[Version] = []
    size = 0
    for start in range(0, len(todo), READ_CHUNK):
        chunk = todo[start : start + READ_CHUNK]
        data = blobs.read(c.blob for c in chunk if c.blob is not None)
        for c in chunk:
            body = data[c.blob] if c.blob is not None else None
            batch.append(Version(c.path, body, c.at, {"commit": c.commit}, always=True))
            size += len(body) if body is not None else 0
            if len(batch) >= BATCH_VERSIONS or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


# -- progress -----------------------------------------------------------------------------


class _Progress:
    """A Rich progress bar on standard error, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.bar: Any = None
        self.task: Any = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("import-git"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("versions"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("import", total=total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)
