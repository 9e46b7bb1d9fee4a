"""The watcher daemon's figures: latency from a file's last write to its committed event, with
100 files each rewritten 10 times in a burst (issue 3); the versions per second it sustains
when the scale workload's documents change in real time (issue 4's daemon path); and CPU use
while idle on a folder of 10,000 files. Real `archive watch` processes on real files.

    .venv/bin/python bench/daemon.py [--db URL] [--debounce 0.5] [--idle-seconds 30]
                                     [--rate 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

RECORDED = re.compile(r"^(\S+ \S+) INFO archive\.watch: recorded (?:created|modified) (\S+) ")


def start(db: str, folder: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "wb") as sink:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "archive", "--db", db, "watch", str(folder), *extra],
            stderr=sink,
        )
    deadline = time.monotonic() + 300
    while "start-up scan" not in log.read_text():
        if time.monotonic() > deadline or daemon.poll() is not None:
            sys.exit(f"the daemon did not start; see {log}")
        time.sleep(0.05)
    return daemon


def latency(db: str | None, debounce: float) -> str:
    base = Path(tempfile.mkdtemp(prefix="archive-daemon-"))
    docs, log = base / "docs", base / "watch.log"
    docs.mkdir()
    db = db or f"sqlite:///{base / 'archive.db'}"
    daemon = start(db, docs, log, "--debounce", str(debounce))
    files = [docs / f"f{i:03}.txt" for i in range(100)]
    last: dict[str, float] = {}
    for round_ in range(10):
        for path in files:
            path.write_text(f"{path.name} round {round_}\n" * 20)
            last[path.name] = time.time()
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(seen) < len(files) and time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            match = RECORDED.match(line)
            if match:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                seen[match.group(2)] = stamp
        time.sleep(0.1)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from archive import Archive

    with Archive(db) as arc:
        final_ok = all(arc.show(p.name).data == p.read_bytes() for p in files)
    waits = sorted(seen[name] - last[name] for name in seen)
    p95 = waits[max(0, int(0.95 * len(waits)) - 1)]
    return (
        f"last write -> committed event, debounce {debounce} s: {len(waits)}/100 files, "
        f"median {statistics.median(waits) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms "
        f"(target {debounce * 1000 + 100:.0f} ms); every final content archived: {final_ok}"
    )


def throughput(rate: int, seconds: float, debounce: float) -> str:
    """The scale workload's first versions (1,000 documents, version j of each before version
    j + 1 of any), written to their files at `rate` a second, in tenths of a second: each file
    changes about once a second at 1,000 a second, less often than the debounce. The daemon
    keeps up if it has committed them soon after the last write; its rate is the events
    committed over the time from the first write to the last commit (a file written again
    before the daemon read it is one version)."""
    import itertools

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench

    wanted = int(rate * seconds)
    versions = list(itertools.islice(bench.synthetic("scale", bench.FULL["scale"]), wanted))
    base = Path(tempfile.mkdtemp(prefix="archive-rate-"))
    docs, log = base / "docs", base / "watch.log"
    docs.mkdir()
    db = f"sqlite:///{base / 'archive.db'}"
    daemon = start(db, docs, log, "--debounce", str(debounce))
    for key in {key for key, _t, _data in versions}:
        (docs / key).parent.mkdir(parents=True, exist_ok=True)
    step = max(1, rate // 10)
    started = time.time()
    for n in range(0, len(versions), step):
        for key, _t, data in versions[n : n + step]:
            (docs / key).write_bytes(data)
        time.sleep(max(0.0, started + (n + step) / rate - time.time()))
    written = time.time()
    committed: list[float] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < max(5.0, 10 * debounce):
        lines = [m for m in map(RECORDED.match, log.read_text().splitlines()) if m]
        if len(lines) > len(committed):
            committed = [
                datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                for m in lines
            ]
            quiet_since = time.monotonic()
        if len(committed) >= len(versions):
            break
        time.sleep(0.2)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from archive import Archive

    final = {key: data for key, _t, data in versions}
    with Archive(db) as arc:
        exact = all(arc.show(key).data == data for key, data in final.items())
        events = len(arc.log())
    last = max(committed) if committed else written
    return (
        f"sustained: {len(versions):,} versions of {len(final):,} files written at {rate:,}/s "
        f"over {written - started:.1f} s; {events:,} events committed, the last "
        f"{last - written:.2f} s after the last write: {events / (last - started):,.0f} "
        f"versions/s (target >= 1,000); every final content archived: {exact}"
    )


def idle_cpu(seconds: float) -> str:
    base = Path(tempfile.mkdtemp(prefix="archive-idle-"))
    docs = base / "docs"
    for d in range(100):
        folder = docs / f"d{d:02}"
        folder.mkdir(parents=True)
        for i in range(100):
            (folder / f"f{i:02}.txt").write_text(f"file {d}/{i}\n" * 30)
    daemon = start(str(base / "archive.db"), docs, base / "watch.log")

    def cpu() -> float:
        fields = Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(2)
    cpu0, wall0 = cpu(), time.monotonic()
    time.sleep(seconds)
    used = (cpu() - cpu0) / (time.monotonic() - wall0)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()
    return (
        f"idle CPU on 10,000 files over {seconds:.0f} s: {used * 100:.2f} % of a core "
        "(target < 1 %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="archive URL for the latency run (default: a new SQLite)")
    parser.add_argument("--debounce", type=float, default=0.5)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--rate", type=int, default=2000, help="versions a second to sustain")
    parser.add_argument("--seconds", type=float, default=10, help="...for this long")
    options = parser.parse_args()
    print(latency(options.db, options.debounce), flush=True)
    # A debounce of 0.2 s: at 2,000 versions a second each of the 1,000 files changes every
    # half second, so no write is folded into the next.
    print(throughput(options.rate, options.seconds, 0.2), flush=True)
    print(idle_cpu(options.idle_seconds), flush=True)


if __name__ == "__main__":
    main()
