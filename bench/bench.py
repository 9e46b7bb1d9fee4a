"""The archive against git, side by side, on the same versions in the same run.

    .venv/bin/python bench/bench.py [--quick] [--rounds N] [--workload main|chain|scale|real ...]

Workloads are built deterministically from seeds/*.txt by cutting, reordering, duplicating and
removing their sentences and swapping their own words (no new prose is ever written):

- main:  100 documents x 100 versions, half growing (appended paragraphs and "Update:" blocks
         cut from the seeds), half edited in place (word swaps, inserted, deleted and moved
         sentences, typo-like character swaps), interleaved in time, each document different;
- chain: seed 002 (emoji, Persian) x 5,000 versions of one document;
- scale: 1,000 documents x 100 versions (100,000 versions): how cost grows;
- real:  the genai-eu-versions bundle (Open Terms Archive, ODC-By 1.0; see
         ../shared/data/README.md) through `archive import-git`.

Each round measures, for git and for the archive on the same versions: ingest rate (library
`record_many` in batches, in a child process so its peak RSS is its own, against `git
fast-import` and against a `git add` + `git commit` loop on the first versions), storage (the
SQLite file after a WAL checkpoint against .git/objects after `git gc --aggressive`), random
point-in-time reads (`Archive.show(key, at=T)` against `git cat-file --batch` fed the blob ids,
per-read latency, start-up excluded), batch reads (`archive show --batch` against `git cat-file
--batch`, pipelined, start-up excluded), export (`archive export --at T` against `git archive`,
whole processes) and start-up (`archive show DOC` against `python -c "import sqlalchemy.orm"`).
Every read is checked against the SHA-256 of the version it should return, so a fast wrong
answer cannot win. The table shows medians over rounds; min-max is the ratio's spread.

Work happens in bench/.work/ (git-ignored), removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "seeds"
WORK = ROOT / "bench" / ".work"
BUNDLE = ROOT.parent / "shared" / "data" / "genai-eu-versions.bundle"
T0 = 1_600_000_000  # 2020-09-13, whole seconds: git keeps no finer time
US = 1_000_000
BATCH = 1000  # versions per record_many call
COLD_READS = 300  # reads with an emptied cache, per round

# Sizes per workload: (documents, versions per document), reads, batch reads, loop subset.
FULL = {
    "main": dict(docs=100, versions=100, reads=2000, batch=20000, loop=300),
    "chain": dict(docs=1, versions=5000, reads=2000, batch=5000, loop=300),
    "scale": dict(docs=1000, versions=100, reads=2000, batch=5000, loop=300),
    "wide": dict(docs=10000, versions=10, reads=2000, batch=5000, loop=300),
    "real": dict(commits=None, reads=2000, batch=5000, loop=300),
}
QUICK = {
    "main": dict(docs=20, versions=25, reads=300, batch=1000, loop=40),
    "chain": dict(docs=1, versions=300, reads=300, batch=1000, loop=40),
    "scale": dict(docs=100, versions=20, reads=300, batch=1000, loop=40),
    "wide": dict(docs=1000, versions=4, reads=300, batch=1000, loop=40),
    "real": dict(commits=120, reads=300, batch=1000, loop=40),
}


# -- text from the seeds ----------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
_WORD = re.compile(r"[^\W\d_]{3,}")


class Seeds:
    """The seed texts cut into paragraphs, sentences and words: the only source of text."""

    def __init__(self) -> None:
        self.texts = [p.read_text(encoding="utf-8") for p in sorted(SEEDS.glob("*.txt"))]
        if len(self.texts) != 5:
            raise SystemExit(f"expected the five seed texts in {SEEDS}")
        self.paragraphs = [
            [p.strip() for p in re.split(r"\n\s*\n|\n", t) if p.strip()] for t in self.texts
        ]
        self.sentences = [
            s.strip()
            for paras in self.paragraphs
            for p in paras
            for s in _SENTENCE_END.split(p)
            if len(s.strip()) > 20
        ]
        self.words = sorted({w for t in self.texts for w in _WORD.findall(t)})


class Editor:
    """In-place edits of a text, each a cut, move, duplicate or swap of the seeds' own text."""

    def __init__(self, seeds: Seeds, rng: random.Random):
        self.seeds = seeds
        self.rng = rng

    def _boundary(self, text: str) -> int:
        """A random sentence boundary (after '. ' or a newline), or the end."""
        if not text:
            return 0
        start = self.rng.randrange(len(text))
        found = re.compile(r"[.!?…]\s|\n").search(text, start)
        return found.end() if found else len(text)

    def _sentence(self, text: str) -> tuple[int, int]:
        a = self._boundary(text)
        found = re.compile(r"[.!?…]\s|\n").search(text, a)
        return a, (found.end() if found else len(text))

    def word_swap(self, text: str) -> str:
        spans = [m.span() for m in _WORD.finditer(text, self.rng.randrange(max(1, len(text))))]
        if not spans:
            return self.insert_sentence(text)
        a, b = spans[min(len(spans) - 1, self.rng.randrange(8))]
        return text[:a] + self.rng.choice(self.seeds.words) + text[b:]

    def typo(self, text: str) -> str:
        m = _WORD.search(text, self.rng.randrange(max(1, len(text))))
        if m is None or m.end() - m.start() < 4:
            return self.word_swap(text)
        i = self.rng.randrange(m.start(), m.end() - 1)
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]

    def insert_sentence(self, text: str) -> str:
        at = self._boundary(text)
        return text[:at] + self.rng.choice(self.seeds.sentences) + " " + text[at:]

    def delete_sentence(self, text: str) -> str:
        a, b = self._sentence(text)
        return text[:a] + text[b:] if b - a < len(text) // 3 else self.typo(text)

    def move_sentence(self, text: str) -> str:
        a, b = self._sentence(text)
        piece, rest = text[a:b], text[:a] + text[b:]
        at = self._boundary(rest)
        return rest[:at] + piece + rest[at:]

    def duplicate_sentence(self, text: str) -> str:
        a, b = self._sentence(text)
        at = self._boundary(text)
        return text[:at] + text[a:b] + text[at:]

    def edit(self, text: str, low: int, high: int) -> str:
        """One to three edits; deletions win when the text is long, insertions when short."""
        ops: list[Callable[[str], str]] = [self.word_swap, self.word_swap, self.typo, self.move]
        if len(text) > high:
            ops = [self.delete_sentence] * 4 + ops
        elif len(text) < low:
            ops = [self.insert_sentence, self.duplicate_sentence] * 2 + ops
        else:
            ops += [self.insert_sentence, self.delete_sentence, self.duplicate_sentence]
        new = text
        for _ in range(self.rng.randint(1, 3)):
            new = self.rng.choice(ops)(new)
        return new if new != text else self.insert_sentence(text)

    def move(self, text: str) -> str:
        return self.move_sentence(text)


# -- synthetic workloads ------------------------------------------------------------------------


def doc_key(i: int, grow: bool) -> str:
    return f"{'threads' if grow else 'pages'}/d{i % 32:02d}/doc{i:04d}.txt"


class _Doc:
    """One synthetic document: its key, its current text and how it changes."""

    def __init__(self, seeds: Seeds, i: int, grow: bool, salt: str):
        self.rng = random.Random(f"{salt}-{i}")
        self.seeds = seeds
        self.grow = grow
        self.key = doc_key(i, grow)
        self.editor = Editor(seeds, self.rng)
        s = i % 5
        paras = seeds.paragraphs[s]
        other = seeds.paragraphs[(s + 1 + (i // 5) % 4) % 5]
        offset = (i // 5 * 7 + self.rng.randrange(len(paras))) % len(paras)
        if grow:
            first = paras[offset : offset + self.rng.randint(2, 5)] or paras[:3]
            self.text = "\n\n".join(first) + "\n"
            self.feed = paras[offset + len(first) :] + other + paras[:offset]
        else:
            rotated = paras[offset:] + paras[:offset]
            body = rotated[: max(8, len(rotated) * 2 // 3)]
            body.insert(self.rng.randrange(len(body)), self.rng.choice(other))
            self.text = "\n\n".join(body) + "\n"
            for _ in range(3):  # make it its own document
                self.text = self.editor.edit(self.text, 0, 10**9)
            self.low, self.high = int(len(self.text) * 0.8), int(len(self.text) * 1.3)
        self.fed = 0

    def step(self) -> None:
        if not self.grow:
            self.text = self.editor.edit(self.text, self.low, self.high)
            return
        if self.rng.random() < 0.3:
            picked = self.rng.sample(self.seeds.sentences, self.rng.randint(1, 3))
            self.text += "\nUpdate: " + " ".join(picked) + "\n"
        else:
            self.text += "\n" + self.feed[self.fed % len(self.feed)] + "\n"
            self.fed += 1


def synthetic(name: str, size: dict[str, Any]) -> Iterator[tuple[str, int, bytes]]:
    """(key, commit time in seconds, bytes) in time order: version j of every document, then
    version j + 1, with distinct, increasing times."""
    seeds = Seeds()
    if name == "chain":
        yield from _chain(seeds, size["versions"])
        return
    n = size["docs"]
    docs = [_Doc(seeds, i, i % 2 == 0, name) for i in range(n)]
    seen: set[str] = set()
    for doc in docs:  # two growing documents may start alike: edit until each is its own
        while doc.text in seen:
            doc.text = doc.editor.edit(doc.text, 0, 10**9)
        seen.add(doc.text)
    jitter = random.Random(f"{name}-times")
    for j in range(size["versions"]):
        for i, doc in enumerate(docs):
            if j:
                doc.step()
            yield doc.key, T0 + (j * n + i) * 7 + jitter.randrange(6), doc.text.encode()


def _chain(seeds: Seeds, versions: int) -> Iterator[tuple[str, int, bytes]]:
    """Seed 002, a live thread: it grows from its first lines, then is edited in place."""
    rng = random.Random("chain")
    lines = seeds.texts[2].splitlines(keepends=True)
    editor = Editor(seeds, rng)
    shown = 20
    text = "".join(lines[:shown])
    full = len(seeds.texts[2])
    for j in range(versions):
        if j:
            if shown < len(lines) and rng.random() < 0.5:
                grow = rng.randint(1, 3)
                text += "".join(lines[shown : shown + grow])
                shown += grow
            else:
                text = editor.edit(text, int(full * 0.8), int(full * 1.3))
        yield "threads/002_40296745153ddbc2.txt", T0 + j * 60 + rng.randrange(50), text.encode()


# -- what each workload holds, for checking reads ------------------------------------------------


@dataclass
class Timeline:
    """Per key, its versions (time in seconds, order, git blob id or None, sha256 or None)."""

    keys: dict[str, list[tuple[int, int, str | None, bytes | None]]] = field(default_factory=dict)
    count: int = 0
    first: int = 0
    last: int = 0

    def add(self, key: str, t: int, order: int, blob: str | None, sha: bytes | None) -> None:
        self.keys.setdefault(key, []).append((t, order, blob, sha))
        self.count += 1
        self.first = min(self.first or t, t)
        self.last = max(self.last, t)

    def finish(self) -> None:
        for versions in self.keys.values():
            versions.sort()

    def at(self, key: str, t_us: int) -> tuple[str | None, bytes | None]:
        """(blob id, sha256) of the version in effect at t_us by the archive's rule."""
        versions = self.keys[key]
        i = bisect.bisect_right(versions, (t_us // US, 1 << 62)) - 1
        if i < 0:
            return None, None
        return versions[i][2], versions[i][3]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# -- processes ------------------------------------------------------------------------------------


def archive_cmd() -> list[str]:
    script = ROOT / ".venv" / "bin" / "archive"
    return [str(script)] if script.exists() else [sys.executable, "-m", "archive"]


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def timed(cmd: list[str], **kw: Any) -> tuple[float, bytes]:
    """Wall seconds of one whole process, and what it wrote on standard error."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    _out, error = proc.communicate()
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{error.decode(errors='replace')[-2000:]}")
    return elapsed, error


def peak_rss_kb() -> int:
    """This process's own peak RSS. Not ru_maxrss: Linux carries that across fork and exec,
    so a child of a big parent would report the parent's memory as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# Runs the archive command line, then reports its peak RSS on standard error.
_WITH_PEAK = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "    sys.stderr.write('BENCH_PEAK_KB ' + (hwm[0].split()[1] if hwm else '0') + '\\n')\n"
    "atexit.register(_peak)\n"
    "from archive.cli import main\n"
    "main(sys.argv[1:])\n"
)


def git_env(t: int | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(WORK),
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.org",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.org",
    }
    if t is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"@{t} +0000"
    return env


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def iso(t_us: int) -> str:
    moment = datetime.fromtimestamp(t_us // US, UTC).replace(microsecond=t_us % US)
    return moment.isoformat().replace("+00:00", "Z")


# -- building the git side and the timeline ------------------------------------------------------


@dataclass
class Prepared:
    """A workload made ready for both sides: git's stream, the reference timeline, and how to
    produce the archive's versions again in a child process."""

    name: str
    size: dict[str, Any]
    stream: Path  # fast-import input
    timeline: Timeline
    first_versions: list[tuple[str, int, bytes]]  # for the commit-per-version loops
    raw_bytes: int
    clone: Path | None = None  # the real workload's repository
    ref: str | None = None


def prepare(name: str, size: dict[str, Any], where: Path) -> Prepared:
    if name == "real":
        return _prepare_real(size, where)
    stream = where / "fast-import.stream"
    timeline = Timeline()
    first: list[tuple[str, int, bytes]] = []
    raw = 0
    with stream.open("wb") as out:
        for n, (key, t, data) in enumerate(synthetic(name, size)):
            out.write(
                b"commit refs/heads/main\nmark :%d\ncommitter bench <bench@example.org> %d +0000\n"
                b"data 0\nM 100644 inline %s\ndata %d\n" % (n + 1, t, key.encode(), len(data))
            )
            out.write(data)
            out.write(b"\n")
            timeline.add(key, t, n, git_blob_id(data), hashlib.sha256(data).digest())
            raw += len(data)
            if n < size["loop"]:
                first.append((key, t, data))
    timeline.finish()
    return Prepared(name, size, stream, timeline, first, raw)


def _prepare_real(size: dict[str, Any], where: Path) -> Prepared:
    if not BUNDLE.exists():
        raise FileNotFoundError(f"{BUNDLE} is absent")
    clone = where / "genai-eu-versions"
    run(["git", "clone", "-q", str(BUNDLE), str(clone)], env=git_env())
    walk = run(["git", "-C", str(clone), "rev-list", "--first-parent", "--reverse", "HEAD"])
    commits = walk.stdout.decode().split()
    if size.get("commits"):
        commits = commits[: size["commits"]]
    ref = commits[-1]
    log = run(
        ["git", "-C", str(clone), "log", "--first-parent", "--reverse", "--raw", "-z",
         "--no-renames", "--no-abbrev", "--root", "-m", "--format=%x01%H %ct", ref, "--"]
    ).stdout
    timeline = Timeline()
    changes: list[tuple[str, int, str | None]] = []
    tokens = iter(log.split(b"\0"))
    t = 0
    for token in tokens:
        token = token.lstrip(b"\n")
        if not token:
            continue
        if token.startswith(b"\x01"):
            t = int(token[1:].split()[1])
            continue
        fields = token[1:].decode().split()
        path = next(tokens).decode()
        blob = None if fields[4] == "D" else fields[3]
        changes.append((path, t, blob))
    blobs = _read_blobs(clone, {b for _p, _t, b in changes if b})
    first: list[tuple[str, int, bytes]] = []
    raw = 0
    for order, (path, t, blob) in enumerate(changes):
        data = blobs[blob] if blob else None
        timeline.add(path, t, order, blob, hashlib.sha256(data).digest() if data else None)
        raw += len(data) if data else 0
        if data is not None and len(first) < size["loop"]:
            first.append((path, t, data))
    timeline.finish()
    stream = where / "fast-import.stream"
    run(["git", "-C", str(clone), "update-ref", "refs/heads/bench-slice", ref])
    with stream.open("wb") as out:
        subprocess.run(
            ["git", "-C", str(clone), "fast-export", "--reencode=no", "--signed-tags=strip",
             "--refspec=refs/heads/bench-slice:refs/heads/main", "refs/heads/bench-slice"],
            stdout=out, check=True,
        )
    return Prepared("real", size, stream, timeline, first, raw, clone, ref)


def _read_blobs(repo: Path, ids: set[str]) -> dict[str, bytes]:
    ordered = sorted(ids)
    proc = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "--batch"],
        input="".join(i + "\n" for i in ordered).encode(),
        capture_output=True, check=True,
    )
    out, pos, found = proc.stdout, 0, {}
    for oid in ordered:
        end = out.index(b"\n", pos)
        n = int(out[pos:end].split()[2])
        found[oid] = out[end + 1 : end + 1 + n]
        pos = end + 2 + n
    return found


# -- one round ---------------------------------------------------------------------------------


def child_ingest(workload: str, quick: bool, db: str, loop_db: str) -> None:
    """Run in a fresh process: ingest the workload, print timings and peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    from archive import Archive
    from archive.api import Version

    size = (QUICK if quick else FULL)[workload]
    result: dict[str, Any] = {}
    with Archive(db) as arc:
        arc.init()
        if workload == "real":
            from archive.importgit import import_git

            clone, ref = os.environ["BENCH_CLONE"], os.environ["BENCH_REF"]
            started = time.perf_counter()
            summary = import_git(arc, clone, ref=ref, progress=False)
            result["seconds"] = time.perf_counter() - started
            result["versions"] = summary["versions"] + summary["unchanged"]
            result["events"] = summary["versions"]
        else:
            spent, count, batch = 0.0, 0, []
            for key, t, data in synthetic(workload, size):
                batch.append(Version(key, data, t * US))
                if len(batch) == BATCH:
                    started = time.perf_counter()
                    arc.record_many(batch)
                    spent += time.perf_counter() - started
                    count += len(batch)
                    batch = []
            if batch:
                started = time.perf_counter()
                arc.record_many(batch)
                spent += time.perf_counter() - started
                count += len(batch)
            result["seconds"], result["versions"] = spent, count
            result["events"] = arc.stats()["events"]
        result["peak_rss_kb"] = peak_rss_kb()
    # The daemon path: one transaction per version, on the first versions.
    first = json.loads(os.environ["BENCH_FIRST"])
    with Archive(loop_db) as arc:
        arc.init()
        versions = [(k, t, Path(p).read_bytes()) for k, t, p in first]
        started = time.perf_counter()
        for key, t, data in versions:
            arc.record(key, data, at=t * US)
        result["record_seconds"] = time.perf_counter() - started
        result["record_versions"] = len(versions)
    print(json.dumps(result))


def checkpoint(db: Path) -> None:
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def ingest_archive(p: Prepared, quick: bool, rnd: Path) -> dict[str, Any]:
    db, loop_db = rnd / "archive.db", rnd / "loop.db"
    first_dir = rnd / "first"
    first_dir.mkdir()
    first = []
    for n, (key, t, data) in enumerate(p.first_versions):
        path = first_dir / f"{n:05d}"
        path.write_bytes(data)
        first.append((key, t, str(path)))
    env = {**os.environ, "BENCH_FIRST": json.dumps(first)}
    if p.clone is not None:
        env.update(BENCH_CLONE=str(p.clone), BENCH_REF=str(p.ref))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", p.name, str(db),
           str(loop_db)] + (["--quick"] if quick else [])
    done = run(cmd, env=env)
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    checkpoint(db)
    result["db_bytes"] = db.stat().st_size
    result["db"] = db
    return result


def ingest_git(p: Prepared, rnd: Path, storage: bool) -> dict[str, Any]:
    repo = rnd / "fast.git"
    run(["git", "init", "-q", "--bare", str(repo)], env=git_env())
    with p.stream.open("rb") as stream:
        seconds, _err = timed(["git", "-C", str(repo), "fast-import", "--quiet",
                               f"--export-marks={rnd / 'marks'}"], stdin=stream, env=git_env())
    result: dict[str, Any] = {"seconds": seconds, "repo": repo}
    if storage:
        run(["git", "-C", str(repo), "gc", "-q", "--aggressive", "--prune=now"], env=git_env())
        result["bytes"] = dir_bytes(repo / "objects")
    # The commit-per-version loop on the first versions.
    work = rnd / "loop"
    run(["git", "init", "-q", str(work)], env=git_env())
    started = time.perf_counter()
    for key, t, data in p.first_versions:
        path = work / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        env = git_env(t)
        run(["git", "-C", str(work), "add", "--", key], env=env)
        run(["git", "-C", str(work), "commit", "-q", "--allow-empty", "-m", "v"], env=env)
    result["loop_seconds"] = time.perf_counter() - started
    return result


def read_pairs(p: Prepared, n: int, salt: str) -> list[tuple[str, int]]:
    """Random (key, time) pairs over the workload's time span, microsecond times."""
    rng = random.Random(f"reads-{p.name}-{salt}")
    keys = sorted(p.timeline.keys)
    lo, hi = p.timeline.first * US, (p.timeline.last + 60) * US
    return [(rng.choice(keys), rng.randrange(lo, hi)) for _ in range(n)]


def reads_archive(p: Prepared, db: Path, pairs: list[tuple[str, int]]) -> dict[str, Any]:
    """Library reads in a fresh Archive (cold cache), each checked against its SHA-256."""
    sys.path.insert(0, str(ROOT))
    from archive import Archive, NotFound

    lat = []
    with Archive(str(db)) as arc:
        with contextlib.suppress(NotFound):  # open the engine and check the schema untimed
            arc.show(pairs[0][0])
        arc.cache.clear()
        for key, t in pairs:
            _blob, sha = p.timeline.at(key, t)
            started = time.perf_counter()
            try:
                got = arc.show(key, at=t).data
            except NotFound:
                got = None
            lat.append(time.perf_counter() - started)
            want = sha is not None
            if (got is not None) != want or (got is not None and
                                              hashlib.sha256(got).digest() != sha):
                raise AssertionError(f"archive returned the wrong version of {key} at {t}")
        # Cold reads: the cache emptied before each one, so every read fetches its chain and
        # replays it from the keyframe (how cost grows with the archive, not with hit rates).
        cold = []
        for key, t in pairs[:COLD_READS]:
            arc.cache.clear()
            started = time.perf_counter()
            with contextlib.suppress(NotFound):
                arc.show(key, at=t)
            cold.append(time.perf_counter() - started)
    result = _latency(lat)
    result["cold_p50"] = statistics.median(cold) * 1e3
    return result


def reads_git(p: Prepared, repo: Path, pairs: list[tuple[str, int]]) -> dict[str, Any]:
    """`git cat-file --batch` as a co-process, fed the blob ids one at a time."""
    proc = subprocess.Popen(["git", "-C", str(repo), "cat-file", "--batch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin and proc.stdout
    lat = []
    wanted = [p.timeline.at(k, t)[0] for k, t in pairs]
    warm = next(b for b in wanted if b)
    proc.stdin.write(warm.encode() + b"\n")
    proc.stdin.flush()
    _git_answer(proc.stdout)
    for blob in wanted:
        started = time.perf_counter()
        if blob is not None:  # the caller already knows it is missing: no read at all
            proc.stdin.write(blob.encode() + b"\n")
            proc.stdin.flush()
            _git_answer(proc.stdout)
        lat.append(time.perf_counter() - started)
    proc.stdin.close()
    proc.wait()
    return _latency(lat)


def _git_answer(out) -> bytes:
    header = out.readline().split()
    data = out.read(int(header[2]))
    out.read(1)
    return data


def _latency(lat: list[float]) -> dict[str, Any]:
    lat_sorted = sorted(lat)
    return {
        "rate": len(lat) / sum(lat),
        "p50": lat_sorted[len(lat) // 2] * 1e3,
        "p99": lat_sorted[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


def batch_archive(p: Prepared, db: Path, pairs: list[tuple[str, int]]) -> float | None:
    """`archive show --batch`, pipelined; the rate after its first answer (start-up off)."""
    proc = subprocess.Popen([*archive_cmd(), "--db", str(db), "show", "--batch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin and proc.stdout
    lines = [f"{k}\t{iso(t)}\n".encode() for k, t in pairs]
    try:
        proc.stdin.write(lines[0])
        proc.stdin.flush()
        if _archive_answer(proc.stdout) is False:
            raise RuntimeError("no answer")
    except (BrokenPipeError, RuntimeError, ValueError, IndexError):
        proc.kill()
        proc.wait()
        return None
    writer = threading.Thread(target=lambda: (proc.stdin.writelines(lines[1:]),
                                              proc.stdin.close()), daemon=True)
    started = time.perf_counter()
    writer.start()
    for key, t in pairs[1:]:
        got = _archive_answer(proc.stdout)
        _blob, sha = p.timeline.at(key, t)
        if (sha.hex() if sha else None) != got:
            raise AssertionError(f"archive show --batch: wrong version of {key} at {iso(t)}")
    elapsed = time.perf_counter() - started
    writer.join()
    proc.wait()
    return (len(pairs) - 1) / elapsed


def _archive_answer(out) -> str | bool | None:
    header = out.readline()
    if not header:
        return False
    words = header.rstrip(b"\n").split(b" ")
    if words[-1] == b"missing" and len(words[0]) != 64:
        return None
    size = int(words[1])
    out.read(size)
    out.read(1)
    return words[0].decode()


def batch_git(p: Prepared, repo: Path, pairs: list[tuple[str, int]]) -> float:
    wanted = [b for b in (p.timeline.at(k, t)[0] for k, t in pairs) if b]
    proc = subprocess.Popen(["git", "-C", str(repo), "cat-file", "--batch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin and proc.stdout
    proc.stdin.write(wanted[0].encode() + b"\n")
    proc.stdin.flush()
    _git_answer(proc.stdout)
    body = b"".join(b.encode() + b"\n" for b in wanted[1:])
    writer = threading.Thread(target=lambda: (proc.stdin.write(body), proc.stdin.close()),
                              daemon=True)
    started = time.perf_counter()
    writer.start()
    for _ in wanted[1:]:
        _git_answer(proc.stdout)
    elapsed = time.perf_counter() - started
    writer.join()
    proc.wait()
    return (len(wanted) - 1) / elapsed


def export_both(p: Prepared, db: Path, repo: Path, rnd: Path) -> dict[str, float]:
    """`archive export --at T` (folder and tar) against `git archive` of the commit at T."""
    mid = (p.timeline.first + p.timeline.last) // 2
    if p.clone is not None:
        commit = run(["git", "-C", str(repo), "rev-list", "-1", "--first-parent",
                      f"--before={iso(mid * US)}", "main"]).stdout.decode().strip()
    else:
        marks = dict(line.split() for line in (rnd / "marks").read_text().splitlines())
        last = max(o for v in p.timeline.keys.values() for (t, o, _b, _s) in v if t <= mid)
        commit = marks[f":{last + 1}"]
    git_s, _ = timed(["git", "-C", str(repo), "archive", "-o", str(rnd / "git.tar"), commit])
    # The folder's peer: git archive unpacked by tar, as one pipeline (a folder of files
    # costs both sides the same file-system work).
    (rnd / "git-dir").mkdir()
    git_dir_s, _ = timed(["sh", "-c", 'git -C "$0" archive "$1" | tar -x -C "$2"',
                          str(repo), commit, str(rnd / "git-dir")])
    at = iso(mid * US)
    export = [*archive_cmd(), "--db", str(db), "export", "--at", at]
    dir_s, _ = timed([*export, "--out", str(rnd / "export-dir")])
    tar_s, _ = timed([*export, "--format", "tar", "--out", str(rnd / "export.tar")])
    manifest = json.loads((rnd / "export-dir" / "MANIFEST.json").read_text())
    if p.clone is None:
        listed = run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", commit]).stdout
        if len(manifest["documents"]) != len(listed.splitlines()):
            raise AssertionError("export and git archive hold different numbers of documents")
    return {"git": git_s, "git_dir": git_dir_s, "dir": dir_s, "tar": tar_s,
            "docs": len(manifest["documents"])}


def startup(db: Path, key: str, reps: int) -> dict[str, float]:
    py = str(ROOT / ".venv" / "bin" / "python")
    py = py if Path(py).exists() else sys.executable
    base, arc = [], []
    for _ in range(reps):
        base.append(timed([py, "-c", "import sqlalchemy.orm"])[0])
        arc.append(timed([*archive_cmd(), "--db", str(db), "show", key])[0])
    return {"git": statistics.median(base), "archive": statistics.median(arc)}


def verify_rss(db: Path) -> tuple[float, int]:
    """`archive verify` as a process: wall seconds and its own peak RSS (KiB)."""
    py = ROOT / ".venv" / "bin" / "python"
    cmd = [str(py) if py.exists() else sys.executable, "-c", _WITH_PEAK]
    seconds, error = timed([*cmd, "--db", str(db), "verify"])
    found = re.search(rb"BENCH_PEAK_KB (\d+)", error)
    return seconds, int(found.group(1)) if found else 0


def cold_chain(db: Path, p: Prepared) -> dict[str, float]:
    """Chain: a cold read of version 50 against a cold read of the last version."""
    sys.path.insert(0, str(ROOT))
    from archive import Archive

    (versions,) = p.timeline.keys.values()
    key = next(iter(p.timeline.keys))
    out = {}
    for label, index in (("v50", min(49, len(versions) - 1)), ("last", len(versions) - 1)):
        lat = []
        for _ in range(15):
            with Archive(str(db)) as arc:
                arc.show(key, version=1)
                arc.cache.clear()
                started = time.perf_counter()
                arc.show(key, at=versions[index][0] * US)
                lat.append(time.perf_counter() - started)
        out[label] = statistics.median(lat) * 1e3
    return out


# -- the rounds and the table --------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    measure: str
    target: str = ""
    higher_better: bool = True  # for the archive
    git: list[float] = field(default_factory=list)
    archive: list[float] = field(default_factory=list)
    ratio_of: Callable[[float, float], float] | None = None
    check: Callable[[float], bool] | None = None
    fmt: str = "{:,.0f}"

    def ratio(self, g: float, a: float) -> float:
        return self.ratio_of(g, a) if self.ratio_of else a / g


def bench_workload(name: str, args: argparse.Namespace, rows: list[Row]) -> None:
    size = (QUICK if args.quick else FULL)[name]
    where = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK))
    log(f"[{name}] building the workload")
    p = prepare(name, size, where)
    log(f"[{name}] {p.timeline.count:,} versions of {len(p.timeline.keys):,} documents, "
        f"{p.raw_bytes / 1e6:,.1f} MB raw")

    def row(measure: str, **kw: Any) -> Row:
        found = next((r for r in rows if r.workload == name and r.measure == measure), None)
        if found is None:
            found = Row(name, measure, **kw)
            rows.append(found)
        return found

    for r in range(args.rounds):
        rnd = where / f"round{r}"
        rnd.mkdir()
        log(f"[{name}] round {r + 1}/{args.rounds}: archive ingest")
        a = ingest_archive(p, args.quick, rnd)
        log(f"[{name}]   {a['versions'] / a['seconds']:,.0f} versions/s; git fast-import")
        g = ingest_git(p, rnd, storage=r == 0)
        bulk = "import-git" if p.clone is not None else "record_many"
        row(f"ingest versions/s (fast-import | {bulk})", target=">= 2x").git.append(
            p.timeline.count / g["seconds"])
        row(f"ingest versions/s (fast-import | {bulk})").archive.append(
            a["versions"] / a["seconds"])
        loop = row(f"ingest versions/s (add+commit loop, first {len(p.first_versions)} | "
                   f"{bulk})", target=">= 30x")
        loop.git.append(len(p.first_versions) / g["loop_seconds"])
        loop.archive.append(a["versions"] / a["seconds"])
        daemon = row("daemon path versions/s (add+commit loop | record per version)",
                     target=">= 1000/s")
        daemon.git.append(len(p.first_versions) / g["loop_seconds"])
        daemon.archive.append(a["record_versions"] / a["record_seconds"])
        daemon.check = lambda _r, d=daemon: statistics.median(d.archive) >= 1000
        if r == 0:
            st = row("storage bytes (gc --aggressive | database file)", target="<= 0.8x",
                     higher_better=False)
            st.git.append(g["bytes"])
            st.archive.append(a["db_bytes"])
            raw = row("storage bytes (raw versions | database file)", higher_better=False,
                      fmt="{:,.0f}")
            raw.git.append(p.raw_bytes)
            raw.archive.append(a["db_bytes"])
        log(f"[{name}]   reads")
        pairs = read_pairs(p, size["reads"], str(r))
        ra, rg = reads_archive(p, a["db"], pairs), reads_git(p, g["repo"], pairs)
        rr = row("reads/s at (doc, T) (cat-file co-process | Archive.show)", target=">= 1x")
        rr.git.append(rg["rate"])
        rr.archive.append(ra["rate"])
        for q in ("p50", "p99"):
            lr = row(f"read latency {q} ms", target="p99 <= 2 ms" if q == "p99" else "",
                     higher_better=False, fmt="{:,.3f}")
            lr.git.append(rg[q])
            lr.archive.append(ra[q])
            if q == "p99":
                lr.check = lambda _r, x=lr: statistics.median(x.archive) <= 2.0
        cold = row("cold read p50 ms (- | cache emptied before each read)",
                   higher_better=False, fmt="{:,.3f}")
        cold.archive.append(ra["cold_p50"])
        bpairs = read_pairs(p, size["batch"], f"batch{r}")
        bg = batch_git(p, g["repo"], bpairs)
        ba = batch_archive(p, a["db"], bpairs)
        br = row(f"batch reads/s x{len(bpairs):,} (cat-file --batch | show --batch)",
                 target=">= 1x")
        br.git.append(bg)
        if ba is not None:
            br.archive.append(ba)
        log(f"[{name}]   export")
        ex = export_both(p, a["db"], g["repo"], rnd)
        for fmt, peer, label in (("tar", "git", "git archive"),
                                 ("dir", "git_dir", "git archive | tar -x")):
            er = row(f"export s, {ex['docs']:,} docs ({label} | export {fmt})",
                     target="<= 2x", higher_better=False, fmt="{:,.3f}")
            er.git.append(ex[peer])
            er.archive.append(ex[fmt])
        if name == ("main" if "main" in args.workload else args.workload[0]):
            log(f"[{name}]   start-up")
            live = next(k for k, v in sorted(p.timeline.keys.items()) if v[-1][3] is not None)
            su = startup(a["db"], live, 3 if args.quick else 7)
            sr = row("start-up s (python -c 'import sqlalchemy.orm' | archive show)",
                     target="<= 1.3x", higher_better=False, fmt="{:,.3f}")
            sr.git.append(su["git"])
            sr.archive.append(su["archive"])
        vs, vrss = verify_rss(a["db"])
        rss = row("peak RSS MB (- | ingest)", higher_better=False, fmt="{:,.1f}")
        rss.archive.append(a["peak_rss_kb"] / 1024)
        vr = row("peak RSS MB (- | verify)", higher_better=False, fmt="{:,.1f}")
        vr.archive.append(vrss / 1024)
        vt = row("verify s (- | archive verify)", higher_better=False, fmt="{:,.2f}")
        vt.archive.append(vs)
        if name == "chain":
            cc = cold_chain(a["db"], p)
            cr = row(f"cold read ms (version 50 | version {p.timeline.count:,})",
                     target="<= 1x", higher_better=False, fmt="{:,.2f}")
            cr.git.append(cc["v50"])
            cr.archive.append(cc["last"])
        if not args.keep:
            shutil.rmtree(rnd)
    if not args.keep:
        shutil.rmtree(where)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def render(rows: list[Row]) -> str:
    header = ("workload", "measure", "git", "archive", "ratio", "min-max", "target")
    table = [header]
    for r in rows:
        g = statistics.median(r.git) if r.git else None
        a = statistics.median(r.archive) if r.archive else None
        pairs = [(x, y) for x, y in zip(r.git, r.archive, strict=False) if x]
        ratios = [r.ratio(x, y) for x, y in pairs]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-"
        target = r.target
        if target and ratios:
            value = statistics.median(ratios)
            if r.check is not None:
                ok = r.check(value)
            else:
                number = float(target.split()[1].rstrip("x"))
                ok = value >= number if target.startswith(">=") else value <= number
            target += " ok" if ok else " MISSED"
        elif target and not ratios:
            target += " (not measured)"
        table.append((
            r.workload,
            r.measure,
            r.fmt.format(g) if g is not None else "-",
            r.fmt.format(a) if a is not None else "-",
            ratio,
            spread,
            target,
        ))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = []
    for n, row in enumerate(table):
        cells = [str(c).rjust(w) if 2 <= i <= 5 else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_scale(rows: list[Row]) -> str:
    """Target 6 of issue 4: scale (1,000 documents) against main (100), archive side: the
    ratio of each measure, within 1.3x (rates no lower than main's / 1.3)."""
    def median(workload: str, prefix: str) -> float | None:
        for r in rows:
            if r.workload == workload and r.measure.startswith(prefix) and r.archive:
                return statistics.median(r.archive)
        return None

    lines = []
    for label, prefix, rate in (
        ("ingest versions/s", "ingest versions/s (fast-import", True),
        ("read latency p50 ms", "read latency p50", False),
        ("read latency p99 ms", "read latency p99", False),
        ("cold read p50 ms", "cold read p50", False),
        ("peak RSS MB, ingest", "peak RSS MB (- | ingest)", False),
        ("peak RSS MB, verify", "peak RSS MB (- | verify)", False),
    ):
        main, scale = median("main", prefix), median("scale", prefix)
        if main and scale:
            ratio = scale / main
            ok = ratio >= 1 / 1.3 if rate else ratio <= 1.3
            lines.append(f"  {label:<22} main {main:>10,.3f}  scale {scale:>10,.3f}  "
                         f"scale/main {ratio:5.2f}x  {'ok' if ok else 'MISSED'}")
    return ("scale against main (archive; target: within 1.3x):\n" + "\n".join(lines)
            if lines else "")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = run(["git", "--version"]).stdout.decode().strip()
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {git}, "
            f"{platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (< ~2 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 2)")
    parser.add_argument("--workload", nargs="+", choices=["main", "chain", "scale", "wide", "real"],
                        default=None, help="default: main chain real")
    parser.add_argument("--keep", action="store_true", help="keep bench/.work/ afterwards")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child_ingest(args._child[0], args.quick, args._child[1], args._child[2])
        return
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.workload = args.workload or ["main", "chain", "real"]
    WORK.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    failed: list[str] = []
    started = time.perf_counter()
    for name in args.workload:
        try:
            bench_workload(name, args, rows)
        except FileNotFoundError as error:
            log(f"[{name}] skipped: {error}")
        except Exception:  # keep what the other workloads measured
            log(f"[{name}] failed:\n{traceback.format_exc()}")
            failed.append(name)
    print(f"archive vs git, {'quick' if args.quick else 'full'} run, {args.rounds} rounds, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()}")
    print("ratio = archive / git (higher is better for rates, lower for sizes and times)")
    print(render(rows))
    flat = render_scale(rows)
    if flat:
        print(flat)
    print(f"(bench took {time.perf_counter() - started:,.0f} s)")
    if failed:
        sys.exit(f"failed workloads: {', '.join(failed)}")


if __name__ == "__main__":
    main()
