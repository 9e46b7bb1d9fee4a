"""Big files (issue 4, target 7): a 100 MB text ingested and replayed exactly with peak RSS
at most 6× its size, and a version with scattered edits recorded in a few seconds.

    .venv/bin/python bench/bigfile.py [--mb 100] [--edits 200] [--keep]

The text is built deterministically from the seeds' own lines (all of them: Persian, emoji),
shuffled with a fixed seed until it reaches the size; version 2 swaps adjacent words at
`--edits` scattered places; version 3 appends one of the seeds' paragraphs. Every step runs
as its own process (`archive` on the command line), timed, with its peak RSS from wait4.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = [sys.executable, "-m", "archive"]
WORD = re.compile(r"\w+")


def build(size: int) -> str:
    lines = []
    for path in sorted((ROOT / "seeds").glob("*.txt")):
        lines += [line + "\n" for line in path.read_text(encoding="utf-8").split("\n") if line]
    rng = random.Random(1)
    out, total = [], 0
    while total < size:
        line = rng.choice(lines)
        total += len(line.encode("utf-8"))
        out.append(line)
    return "".join(out)


def scatter(text: str, edits: int) -> str:
    """Swap two neighbouring words at `edits` places spread over the text."""
    rng = random.Random(2)
    pieces, pos = [], 0
    for offset in sorted(rng.sample(range(len(text) - 10_000), edits)):
        if offset < pos:
            continue
        first = WORD.search(text, offset)
        second = WORD.search(text, first.end())
        pieces += [text[pos : first.start()], second.group(), text[first.end() : second.start()],
                   first.group()]
        pos = second.end()
    pieces.append(text[pos:])
    return "".join(pieces)


def run(args: list[str], stdout=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=stdout or subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return elapsed, usage.ru_maxrss * 1024


def generate(work: Path, mb: int, edits: int) -> None:
    """Write v1..v3 (run in a child: the measuring parent must stay small, since a forked
    child's peak RSS starts from its parent's)."""
    v1 = build(mb * 1_000_000)
    v2 = scatter(v1, edits)
    v3 = v2 + "\n" + build(4_000)[:2_000]
    for number, text in enumerate((v1, v2, v3), start=1):
        (work / f"v{number}.txt").write_bytes(text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--_generate", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._generate:
        generate(Path(opts._generate), opts.mb, opts.edits)
        return
    work = Path(tempfile.mkdtemp(prefix="bigfile-", dir=ROOT / "bench"))
    try:
        run([sys.executable, __file__, "--mb", str(opts.mb), "--edits", str(opts.edits),
             "--_generate", str(work)])
        db = work / "big.db"
        rows = []
        versions = []
        names = ("v1 new", f"v2 {opts.edits} edits", "v3 appended")
        for number, name in enumerate(names, start=1):
            path = work / "big.txt"
            os.replace(work / f"v{number}.txt", path)
            versions.append((name, path.stat().st_size, sha256_file(path)))
            seconds, rss = run([*ARCHIVE, "--db", str(db), "ingest", str(path), "--root",
                                str(work)])
            rows.append((f"record {name}", seconds, rss, versions[-1][1]))
        for number, (name, size, sha) in enumerate(versions, start=1):
            out = work / f"shown{number}"
            with out.open("wb") as sink:
                seconds, rss = run([*ARCHIVE, "--db", str(db), "show", "big.txt", "--version",
                                    str(number)], stdout=sink)
            digest = sha256_file(out)
            out.unlink()
            if digest != sha:
                raise SystemExit(f"show {name}: wrong bytes")
            rows.append((f"show {name} (exact)", seconds, rss, size))
        print(f"big file: {versions[0][1] / 1e6:.0f} MB text (seed lines: Persian, emoji), "
              f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        print(f"{'step':<28} {'seconds':>8} {'peak RSS MB':>12} {'RSS / size':>11}  target")
        for step, seconds, rss, size in rows:
            ratio = rss / size
            verdict = "ok" if ratio <= 6 else "MISSED"
            print(f"{step:<28} {seconds:>8.2f} {rss / 1e6:>12.0f} {ratio:>10.2f}x  "
                  f"<= 6x {verdict}")
        print(f"database: {db.stat().st_size / 1e6:.1f} MB for 3 versions")
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
