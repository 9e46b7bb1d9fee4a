"""`archive watch` (issue 3) as users run it: the real daemon in a subprocess, real files
changed the way people, editors and tools change them, the archive read back and compared with
the folder. Each scenario runs on a SQLite file and on a fresh PostgreSQL database.

Synchronisation is always "poll the archive until it holds what the folder holds" with a
timeout; sleeps only pace the writers (a burst, a pause longer than the debounce period)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from archive import Archive
from archive.errors import NotFound

DEBOUNCE = "0.2"
SLOW = "0.6"  # a second daemon's longer debounce period
TIMEOUT = 20.0  # generous: a loaded CI machine; a pass takes a fraction of it
IGNORED_NAMES = ("4913",)
IGNORED_SUFFIXES = ("~", ".tmp", ".swp")


# -- helpers -----------------------------------------------------------------------------------


def wait_for(check: Callable[[], Any], what: str, timeout: float = TIMEOUT, logs=None) -> Any:
    """Poll `check` until it returns something truthy; fail with the daemons' logs."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except NotFound as error:
            last = error
        if time.monotonic() > deadline:
            shown = "\n".join(d.log()[-4000:] for d in (logs or []))
            pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{shown}")
        time.sleep(0.05)


def is_archived_name(relative: str) -> bool:
    """The test's own statement of the default ignore rules (the oracle)."""
    parts = relative.split("/")
    name = parts[-1]
    return not (
        any(p.startswith(".") for p in parts)
        or name in IGNORED_NAMES
        or name.endswith(IGNORED_SUFFIXES)
        or (name.startswith("#") and name.endswith("#"))
    )


def disk_state(folder: Path, root: Path | None = None) -> dict[str, bytes]:
    root = root or folder
    found = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not path.name.startswith("archive.db") and is_archived_name(relative):
            found[relative] = path.read_bytes()
    return found


def archive_state(arc: Archive, prefix: str = "") -> dict[str, bytes]:
    _, events = arc.corpus()
    events = [e for e in events if e.key.startswith(prefix)]
    data = arc.read_contents([e.content_id for e in events])
    return {e.key: data[e.content_id] for e in events}


def wait_in_sync(arc: Archive, folder: Path, root: Path | None = None, logs=None, prefix=""):
    """Until the archive's current documents under `prefix` are exactly the folder's files."""
    return wait_for(
        lambda: archive_state(arc, prefix) == disk_state(folder, root),
        f"the archive to match {folder}",
        logs=logs,
    )


def current(arc: Archive, key: str) -> bytes | None:
    try:
        return arc.show(key).data
    except NotFound:
        return None


def assert_clean_histories(arc: Archive) -> None:
    """Gapless sequence numbers, no version of unchanged content, and verify passes."""
    assert arc.verify() == []
    for key in {e.key for e in arc.log()}:
        history = arc.history(key)
        assert [e.seq for e in history] == list(range(1, len(history) + 1)), key
        previous = None
        for e in history:
            if e.type == "modified":
                assert e.sha256 != previous, f"{key} v{e.seq} repeats v{e.seq - 1}"
            previous = e.sha256 if e.type != "deleted" else None


def assert_one_transaction(renames: list[Any]) -> None:
    """Renamed events recorded together: consecutive positions, nothing in between. (The
    archive gives each rename of a `rename_many` its own recorded_at, so that cannot tell.)"""
    positions = sorted(e.position for e in renames)
    assert positions == list(range(positions[0], positions[0] + len(positions))), positions


@contextmanager
def half_moves(db_url: str, old: str, new: str) -> Iterator[list[tuple[int, int]]]:
    """While the block runs, a reader polls the live keys; yields the (old, new) counts of
    every snapshot that had documents under both prefixes (a folder seen half moved)."""
    seen: list[tuple[int, int]] = []
    done = threading.Event()
    reader = Archive(db_url)

    def poll() -> None:
        while not done.is_set():
            keys = reader.live_keys()
            counts = (sum(k.startswith(old) for k in keys), sum(k.startswith(new) for k in keys))
            if all(counts):
                seen.append(counts)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        reader.close()


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def us(moment: str) -> int:
    return int(datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp() * 1_000_000)


def set_mtime(path: Path, moment: str) -> None:
    seconds = us(moment) / 1_000_000
    os.utime(path, (seconds, seconds))


class Daemon:
    """One `archive watch` process, its standard error going to a file we can poll."""

    def __init__(
        self, db: str, args: list[str], cwd: Path, log_path: Path, wrap: list[str] | None = None
    ):
        env = {k: v for k, v in os.environ.items() if k not in ("ARCHIVE_DB", "ARCHIVE_DEBUG")}
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop/kill)
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", "archive", "--db", db, "watch", *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = TIMEOUT) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.log():
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            return text in self.log()

        wait_for(seen, f"{text!r} in the daemon's log", timeout, logs=[self])

    def ready(self) -> Daemon:
        self.wait_log("start-up scan:")
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def daemons(tmp_path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons; whatever is still running at the end of the test is killed."""
    started: list[Daemon] = []

    def start(db: str, *args: str | Path, wrap: list[str] | None = None) -> Daemon:
        log_path = tmp_path / f"watch-{len(started)}.log"
        daemon = Daemon(db, [str(a) for a in args], tmp_path, log_path, wrap)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def vim_save(path: Path, data: bytes) -> None:
    """What vim does on :w with its defaults (writebackup, backupcopy=auto on a plain file):
    a probe file 4913 to test the folder, the original renamed to `file~`, the new bytes
    written to a new `file`, the backup removed; `.file.swp` lives through it all."""
    swap = path.with_name(f".{path.name}.swp")
    swap.write_bytes(b"b0VIM 9.0\0" + bytes(1000))
    probe = path.with_name("4913")
    probe.write_bytes(b"")
    probe.unlink()
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        handle.write(data[len(data) // 2 :])
    backup.unlink()
    swap.unlink()


# -- scenarios ---------------------------------------------------------------------------------


def test_users_and_editors(db_url, tmp_path, daemons):
    """Create, write in a row, editors' saves, sed -i, delete and come back, renames of a
    file and of a folder, a move out of the tree; SIGINT then stops it with exit 0."""
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "x.txt").write_bytes(b"x before the daemon\n")
    (docs / "sub" / "y.txt").write_bytes(b"y before the daemon\n")
    (docs / "gone.txt").write_bytes(b"here before\n")
    arc = Archive(db_url)
    daemon = daemons(db_url, docs, "--debounce", DEBOUNCE).ready()
    logs = [daemon]
    wait_in_sync(arc, docs, logs=logs)

    # Several writes in a row, then several appends: one version once quiet.
    a = docs / "a.txt"
    with open(a, "wb") as handle:
        for i in range(5):
            handle.write(b"line %d\n" % i)
            handle.flush()
    for i in range(5, 10):
        with open(a, "ab") as handle:
            handle.write(b"line %d\n" % i)
    wait_in_sync(arc, docs, logs=logs)
    assert [e.type for e in arc.history("a.txt")] == ["created"]
    assert "recorded created a.txt v1 sha256 " + sha(a.read_bytes()).hex()[:12] in daemon.log()

    # A slow writer (pauses shorter than the debounce period): read once, when complete.
    slow = docs / "slow.txt"
    with open(slow, "wb") as handle:
        for i in range(8):
            handle.write(b"chunk %d\n" % i)
            handle.flush()
            time.sleep(0.05)
    # A file that vanishes before it could be read: nothing to record, nothing to report.
    (docs / "flash.txt").write_bytes(b"here and gone\n")
    (docs / "flash.txt").unlink()
    wait_in_sync(arc, docs, logs=logs)
    assert [(e.type, e.size) for e in arc.history("slow.txt")] == [("created", 64)]
    assert "flash.txt" not in daemon.log()

    # The vim sequence: one modified version, nothing of its swap, probe or backup files.
    vim_save(a, a.read_bytes() + b"added in vim\n")
    wait_for(lambda: current(arc, "a.txt") == a.read_bytes(), "vim's save", logs=logs)
    assert [e.type for e in arc.history("a.txt")] == ["created", "modified"]

    # The real vim, when installed, saving through its own sequence.
    vim = shutil.which("vim")
    if vim:
        subprocess.run(
            [vim, "-N", "-u", "NONE", "-i", "NONE", "-es", "-c",
             "set nobackup writebackup backupcopy=no", "-c", "$put ='real vim'", "-c", "wq",
             str(a)],
            check=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert a.read_bytes().endswith(b"real vim\n")
        wait_for(lambda: current(arc, "a.txt") == a.read_bytes(), "vim's own save", logs=logs)

    # Atomic saves: a temporary file replaces the target (visible *.tmp, then hidden).
    b = docs / "b.txt"
    b.write_bytes(b"b one\n")
    wait_for(lambda: current(arc, "b.txt") == b"b one\n", "b.txt", logs=logs)
    tmp = docs / "b.txt.tmp"
    tmp.write_bytes(b"b two, replaced atomically\n")
    os.replace(tmp, b)
    wait_for(lambda: current(arc, "b.txt") == b.read_bytes(), "os.replace", logs=logs)
    hidden = docs / ".b.txt.Xy12Ab"
    hidden.write_bytes(b"b three, as rsync writes\n")
    os.replace(hidden, b)
    wait_for(lambda: current(arc, "b.txt") == b.read_bytes(), "rsync-like save", logs=logs)

    # sed -i: its own temporary file in the folder, renamed over the target.
    subprocess.run(["sed", "-i", "s/three/four/", str(b)], check=True)
    assert b.read_bytes() == b"b four, as rsync writes\n"
    wait_for(lambda: current(arc, "b.txt") == b.read_bytes(), "sed -i", logs=logs)
    assert [e.type for e in arc.history("b.txt")] == ["created"] + ["modified"] * 3

    # Delete, and come back: the same document continues.
    b.unlink()
    wait_for(lambda: arc.history("b.txt")[-1].type == "deleted", "b.txt deleted", logs=logs)
    b.write_bytes(b"b is back\n")
    wait_for(lambda: current(arc, "b.txt") == b"b is back\n", "b.txt back", logs=logs)
    history = arc.history("b.txt")
    assert [e.type for e in history[-2:]] == ["deleted", "created"]
    assert len({e.doc_id for e in history}) == 1

    # Rename a file: history follows it, by the new name and by the old one.
    os.rename(a, docs / "renamed.txt")
    wait_for(lambda: "renamed.txt" in arc.live_keys(), "the rename", logs=logs)
    history = arc.history("renamed.txt")
    assert history[-1].type == "renamed" and history[-1].meta == {"from": "a.txt"}
    assert history[0].key == "a.txt" and history[0].type == "created"
    assert arc.history("a.txt") == history

    # Rename a whole folder.
    os.rename(docs / "sub", docs / "moved")
    wait_for(lambda: {"moved/x.txt", "moved/y.txt"} <= set(arc.live_keys()), "folder", logs=logs)
    for name in ("x.txt", "y.txt"):
        history = arc.history(f"moved/{name}")
        assert [e.type for e in history] == ["created", "renamed"]
        assert history[-1].meta == {"from": f"sub/{name}"}

    # Moved out of the tree: a deletion.
    os.rename(docs / "gone.txt", tmp_path / "outside.txt")
    wait_for(lambda: "gone.txt" not in arc.live_keys(), "move out", logs=logs)

    wait_in_sync(arc, docs, logs=logs)
    assert not [k for k in arc.live_keys() if not is_archived_name(k)]
    assert daemon.stop(signal.SIGINT) == 0, daemon.log()
    assert_clean_histories(arc)
    arc.close()


def test_sigkill_in_a_burst_then_restart(db_url, tmp_path, daemons):
    """SIGKILL while files are being rewritten and recorded; changes while it is down; the
    restart records the final content of every file, nothing twice, and verify is clean."""
    docs = tmp_path / "docs"
    (docs / "folder").mkdir(parents=True)
    files = [docs / f"f{i:02}.txt" for i in range(20)]
    for i, path in enumerate(files):
        path.write_bytes(b"file %d initial\n" % i)
    for name in ("p.txt", "q.txt"):
        (docs / "folder" / name).write_bytes(f"{name} stays as it is\n".encode())
    (docs / "lone.txt").write_bytes(b"a file renamed while the daemon is down\n")
    arc = Archive(db_url)
    first = daemons(db_url, docs, "--debounce", DEBOUNCE).ready()
    wait_in_sync(arc, docs, logs=[first])

    for round_ in range(10):
        for i, path in enumerate(files):
            with open(path, "ab") as handle:
                handle.write(b"round %d of file %d\n" % (round_, i))
        if round_ == 5:
            first.wait_log("recorded modified")  # versions of the burst are being committed
            first.kill()
        time.sleep(0.12)

    # While it is down: deletions, new files, and a same-size edit with the mtime restored.
    for path in files[:3]:
        path.unlink()
    for i in range(3):
        (docs / f"new{i}.txt").write_bytes(b"new while down %d\n" % i)
    sneaky = files[3]
    before = sneaky.stat()
    sneaky.write_bytes(sneaky.read_bytes().replace(b"round 9", b"ROUND 9"))
    os.utime(sneaky, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert sneaky.stat().st_size == before.st_size
    # Renames while down: found again by content, so history still follows them.
    os.rename(docs / "folder", docs / "renamed folder")
    os.rename(docs / "lone.txt", docs / "renamed lone.txt")

    second = daemons(db_url, docs, "--debounce", DEBOUNCE).ready()
    wait_in_sync(arc, docs, logs=[second])
    assert_clean_histories(arc)
    for key, old in (
        ("renamed folder/p.txt", "folder/p.txt"),
        ("renamed folder/q.txt", "folder/q.txt"),
        ("renamed lone.txt", "lone.txt"),
    ):
        assert [e.type for e in arc.history(key)] == ["created", "renamed"], key
        assert arc.history(old) == arc.history(key)
    assert second.stop() == 0
    events = len(arc.log())

    # A restart with nothing changed records nothing.
    third = daemons(db_url, docs, "--debounce", DEBOUNCE).ready()
    assert "0 changes sent" in third.log()
    assert third.stop() == 0
    assert len(arc.log()) == events
    result = run_cli("verify", db=db_url)
    assert result.returncode == 0, result.stderr
    arc.close()


def test_once_reconciles_with_mtime(db_url, tmp_path):
    """`--once` records what changed since the last run and exits 0; with `--effective-time
    mtime` versions take the files' modification times."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes(b"a as published\n")
    set_mtime(docs / "a.txt", "2020-01-03T08:00:00")
    (docs / "b.txt").write_bytes(b"b as published\n")
    set_mtime(docs / "b.txt", "2020-01-04T09:30:00")

    def once() -> None:
        result = run_cli(
            "watch", str(docs), "--once", "--effective-time", "mtime", db=db_url, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr.decode()

    once()
    arc = Archive(db_url)
    assert archive_state(arc) == disk_state(docs)
    assert arc.history("a.txt")[0].effective_at == us("2020-01-03T08:00:00")
    assert arc.history("b.txt")[0].effective_at == us("2020-01-04T09:30:00")

    (docs / "a.txt").write_bytes(b"a, corrected\n")
    set_mtime(docs / "a.txt", "2020-01-05T10:00:00")
    (docs / "b.txt").unlink()
    (docs / "c.txt").write_bytes(b"c appears\n")
    set_mtime(docs / "c.txt", "2020-01-06T00:00:00")
    once()
    assert archive_state(arc) == disk_state(docs)
    assert [(e.type, e.effective_at) for e in arc.history("a.txt")] == [
        ("created", us("2020-01-03T08:00:00")),
        ("modified", us("2020-01-05T10:00:00")),
    ]
    assert arc.history("b.txt")[-1].type == "deleted"
    assert arc.show("a.txt", at="2020-01-04T00:00:00Z").data == b"a as published\n"

    # Nothing changed: nothing recorded.
    events = len(arc.log())
    once()
    assert len(arc.log()) == events

    # A file that comes back with an mtime older than its deletion is still current.
    (docs / "b.txt").write_bytes(b"b restored from an old backup\n")
    set_mtime(docs / "b.txt", "2019-12-31T00:00:00")
    once()
    assert archive_state(arc) == disk_state(docs)
    assert_clean_histories(arc)
    arc.close()


def test_sigterm_records_pending_work(db_url, tmp_path, daemons):
    """A change still inside its debounce period is recorded on SIGTERM, then exit 0."""
    docs = tmp_path / "docs"
    docs.mkdir()
    daemon = daemons(db_url, docs, "--debounce", "60", "--log-level", "debug").ready()
    (docs / "late.txt").write_bytes(b"written just before the stop\n")
    daemon.wait_log(f"pending {docs / 'late.txt'}")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    assert time.monotonic() - started < 10
    log = daemon.log()
    assert log.index("recorded created late.txt") < log.index("stopped")
    arc = Archive(db_url)
    assert current(arc, "late.txt") == b"written just before the stop\n"
    arc.close()


def test_two_daemons_one_archive(db_url, tmp_path, daemons):
    """Two daemons on the same folder (one slower to read than the other) and a third on
    another folder, one archive: every version once, gapless sequences, verify clean. Then
    bursts of rewrites, the first while the writers' lock is held so that both daemons wait
    with what they read (the quick one with older bytes, then paused while the slow one
    commits newer ones): each file's versions stay in the order they were written, never
    twice in a row, and end with its final bytes. A folder move is renamed once."""
    base = tmp_path / "base"
    shared, other = base / "shared", base / "other"
    (shared / "sub").mkdir(parents=True)
    other.mkdir()
    for name in ("s1.txt", "s2.txt", "s3.txt"):
        (shared / "sub" / name).write_bytes(f"sub/{name}\n".encode())
    args = ("--root", base, "--debounce", DEBOUNCE)
    arc = Archive(db_url)
    arc.init()  # both daemons start on an existing archive; creating it is tested elsewhere
    quick = daemons(db_url, shared, *args, "--log-level", "debug")
    slow = daemons(db_url, shared, "--root", base, "--debounce", SLOW, "--log-level", "debug")
    running = [quick, slow, daemons(db_url, other, *args)]
    for daemon in running:
        daemon.ready()
    names = [f"doc{i:02}.txt" for i in range(12)]

    def write_round(folder: Path, names: list[str], n: int) -> None:
        for name in names:
            (folder / name).write_bytes(f"{folder.name}/{name} round {n}\n".encode())

    for round_ in range(3):
        for folder in (shared, other):
            write_round(folder, names, round_)
        wait_in_sync(arc, base, logs=running)
    for folder in ("shared", "other"):
        for name in names[2:]:
            history = arc.history(f"{folder}/{name}")
            assert [e.type for e in history] == ["created", "modified", "modified"], history

    os.rename(shared / names[0], shared / "renamed.txt")
    (shared / names[1]).unlink()
    (other / names[1]).unlink()
    wait_in_sync(arc, base, logs=running)
    history = arc.history("shared/renamed.txt")
    assert [e.type for e in history] == ["created", "modified", "modified", "renamed"]
    assert [e.type for e in arc.history("shared/doc01.txt")][-1] == "deleted"

    # The reported gap: a daemon that waited for the lock longer than the debounce period
    # must not commit what it read after another daemon committed newer bytes.
    burst = ["renamed.txt", *names[2:]]
    with arc.store.write():  # the writers' lock: every commit waits
        write_round(shared, burst, 3)
        time.sleep(float(DEBOUNCE) + 0.3)  # the quick daemon reads round 3, then waits
        write_round(shared, burst, 4)
        time.sleep(float(SLOW) + 0.4)  # the slow one reads round 4, then waits too
        quick.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)  # SQLite: the slow daemon commits first (PostgreSQL: the quick one)
    finally:
        quick.proc.send_signal(signal.SIGCONT)
    # Rapid rewrites, paced around the two debounce periods.
    for n, pause in enumerate((0.05, 0.3, 0.05, 0.45, 0.1, 0.3, 0.0), start=5):
        write_round(shared, burst, n)
        time.sleep(pause)
    wait_in_sync(arc, base, logs=running)

    os.rename(shared / "sub", shared / "moved")
    wait_in_sync(arc, base, logs=running)

    for daemon in running:
        assert daemon.stop() == 0, daemon.log()
    assert archive_state(arc) == disk_state(base)
    assert_clean_histories(arc)
    assert "conflict shared/" in quick.log() + slow.log()
    for name in burst:
        # Content versions (a rename keeps the content it moves).
        versions = [v for v in arc.versions(f"shared/{name}") if v.event.type != "renamed"]
        assert versions[-1].data == (shared / name).read_bytes(), name
        for a, b in pairwise(versions):
            assert a.event.sha256 != b.event.sha256, f"{name} v{b.event.seq} repeats"
        rounds = [int(v.data.split()[-1]) for v in versions]
        assert rounds == sorted(set(rounds)), f"{name}: versions out of order: {rounds}"
    moved = [arc.history(f"shared/moved/{n}") for n in ("s1.txt", "s2.txt", "s3.txt")]
    assert [[e.type for e in h] for h in moved] == [["created", "renamed"]] * 3
    assert_one_transaction([h[-1] for h in moved])
    arc.close()


def test_folder_move_is_one_transaction(db_url, tmp_path, daemons):
    """A moved folder's documents are renamed in one transaction (a reader never sees the
    folder half moved) and their histories follow them; where a target name is already a
    live document, that one becomes a change of the target (and the source's deletion)
    while the others are still renamed together."""
    docs = tmp_path / "docs"
    project = docs / "project"
    (project / "deep" / "er").mkdir(parents=True)
    inside = [f"n{i:02}.txt" for i in range(20)] + ["deep/c.txt", "deep/er/d.txt"]
    for name in inside:
        (project / name).write_bytes(f"{name} in the project\n".encode())
    (project / ".hidden").write_bytes(b"never archived\n")
    second = docs / "second"
    second.mkdir()
    for name in ("x.txt", "y.txt", "z.txt"):
        (second / name).write_bytes(f"second/{name}\n".encode())
    arc = Archive(db_url)
    daemon = daemons(db_url, docs, "--debounce", DEBOUNCE, "--log-level", "debug").ready()
    wait_in_sync(arc, docs, logs=[daemon])

    with half_moves(db_url, "project/", "moved project/") as seen:
        os.rename(project, docs / "moved project")
        wait_in_sync(arc, docs, logs=[daemon])
    assert seen == [], "a reader saw the folder half moved"
    histories = [arc.history(f"moved project/{name}") for name in inside]
    for name, history in zip(inside, histories, strict=True):
        assert [e.type for e in history] == ["created", "renamed"], name
        assert history[-1].meta == {"from": f"project/{name}"}
        assert arc.history(f"project/{name}") == history
    assert_one_transaction([h[-1] for h in histories])

    # Another writer recorded a document where one file is going: no file there, so the
    # daemon does not know it (and believes the name is free).
    arc.record("target/y.txt", b"recorded by another writer\n")
    os.rename(second, docs / "target")
    wait_in_sync(arc, docs, logs=[daemon])
    together = [arc.history(f"target/{name}") for name in ("x.txt", "z.txt")]
    assert [[e.type for e in h] for h in together] == [["created", "renamed"]] * 2
    assert_one_transaction([h[-1] for h in together])
    assert [e.type for e in arc.history("target/y.txt")] == ["created", "modified"]
    assert [e.type for e in arc.history("second/y.txt")] == ["created", "deleted"]
    assert "conflict target/y.txt" in daemon.log()
    assert daemon.stop() == 0, daemon.log()
    assert_clean_histories(arc)
    arc.close()


# -- SQLite only: options and failure modes that do not depend on the engine -------------------


def test_polling_ignores_and_own_database(tmp_path, daemons):
    """--polling, --ignore globs and the default ignores; the SQLite archive inside the
    watched folder is never recorded; a symlink cycle in the folder does not hang it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "loop").symlink_to(".")  # a cycle: the polling snapshots do not follow it
    db = f"sqlite:///{docs / 'archive.db'}"
    daemon = daemons(
        db, docs, "--polling", "--debounce", DEBOUNCE, "--ignore", "*.log", "--ignore", "build"
    ).ready()
    arc = Archive(db)
    (docs / "keep.txt").write_bytes(b"keep\n")
    (docs / "sub").mkdir()
    (docs / "sub" / "deep.txt").write_bytes(b"deep\n")
    for name in ("notes.log", "x.tmp", "y~", ".#lock", "#autosave#", "4913", ".hidden"):
        (docs / name).write_bytes(b"ignored\n")
    (docs / "build").mkdir()
    (docs / "build" / "out.txt").write_bytes(b"ignored folder\n")
    (docs / ".git").mkdir()
    (docs / ".git" / "HEAD").write_bytes(b"ignored hidden folder\n")
    expected = {"keep.txt": b"keep\n", "sub/deep.txt": b"deep\n"}
    wait_for(lambda: archive_state(arc) == expected, "the polled files", logs=[daemon])

    tmp = docs / "keep.txt.tmp"
    tmp.write_bytes(b"keep, saved atomically\n")
    os.replace(tmp, docs / "keep.txt")
    expected["keep.txt"] = b"keep, saved atomically\n"
    wait_for(lambda: archive_state(arc) == expected, "the polled save", logs=[daemon])
    assert daemon.stop() == 0
    assert archive_state(arc) == expected
    assert not [line for line in daemon.log().splitlines() if "archive.db" in line]
    arc.close()


def test_a_hard_link_to_the_database_is_never_recorded(tmp_path, daemons):
    """A hard link to the archive's database inside the watched folder has a name of its
    own, and changes with every commit: recorded, each rescan would find a new version of
    it. The daemon recognises it by its inode, says so once over several rescans, and
    records the rest, a hard link to an ordinary file included. That rescans ran is seen
    from a change made through that link from outside the folder, which only a rescan finds."""
    docs = tmp_path / "docs"
    docs.mkdir()
    db_path = tmp_path / "arch.db"
    with Archive(str(db_path)) as arc:
        arc.init()
    os.link(db_path, docs / "copy.db")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"outside 0\n")
    os.link(outside, docs / "seen.txt")
    daemon = daemons(str(db_path), docs, "--debounce", DEBOUNCE, "--rescan", "0.5").ready()
    arc = Archive(str(db_path))
    expected = {"seen.txt": b"outside 0\n"}
    for n in range(1, 4):
        (docs / f"doc{n}.txt").write_bytes(b"version %d\n" % n)
        expected[f"doc{n}.txt"] = b"version %d\n" % n
        outside.write_bytes(b"outside %d\n" % n)  # the same inode: no notification in docs
        expected["seen.txt"] = b"outside %d\n" % n
        wait_for(lambda: archive_state(arc) == expected, f"round {n}", logs=[daemon])
    assert daemon.stop() == 0
    assert archive_state(arc) == expected
    assert [ev.key for ev in arc.log() if ev.key == "copy.db"] == []
    assert daemon.log().count("a hard link to the archive's own database") == 1
    arc.close()


def test_rescan_finds_what_notifications_missed(tmp_path, daemons):
    """A write through a hard link outside the folder raises no notification in it; the
    periodic rescan notices the file's stat changed and records it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    db = f"sqlite:///{tmp_path / 'archive.db'}"
    target = docs / "linked.txt"
    target.write_bytes(b"version one\n")
    outside = tmp_path / "outside-link.txt"
    os.link(target, outside)
    daemon = daemons(db, docs, "--debounce", DEBOUNCE, "--rescan", "1").ready()
    arc = Archive(db)
    wait_in_sync(arc, docs, logs=[daemon])
    with open(outside, "ab") as handle:
        handle.write(b"version two, written elsewhere\n")
    wait_in_sync(arc, docs, logs=[daemon])
    assert [e.type for e in arc.history("linked.txt")] == ["created", "modified"]
    assert daemon.stop() == 0
    arc.close()


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv")
def test_unreadable_file_is_logged_and_retried(tmp_path, daemons):
    """A file the daemon may not read is logged and skipped, the rest is recorded, the
    daemon keeps running, and once the file becomes readable it is recorded too. (Root reads
    everything: the daemon runs as root without the DAC-override capabilities.)"""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "open.txt").write_bytes(b"anyone may read this\n")
    secret = docs / "secret.txt"
    secret.write_bytes(b"not yet\n")
    secret.chmod(0)
    db = f"sqlite:///{tmp_path / 'archive.db'}"
    drop = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search", "--"]
    daemon = daemons(db, docs, "--debounce", DEBOUNCE, wrap=drop).ready()
    daemon.wait_log(f"cannot read {secret}")
    arc = Archive(db)
    wait_for(lambda: "open.txt" in arc.live_keys(), "the readable file", logs=[daemon])
    assert "secret.txt" not in arc.live_keys()
    (docs / "more.txt").write_bytes(b"still running\n")
    secret.chmod(0o644)  # an attribute change: the daemon tries again
    wait_in_sync(arc, docs, logs=[daemon])
    assert current(arc, "secret.txt") == b"not yet\n"
    assert daemon.stop() == 0
    arc.close()


def test_keys_are_those_of_ingest(tmp_path):
    """The same folder gives the same keys and bytes through `ingest --root` and `watch`,
    with an explicit root and with watch's default (the one folder watched)."""
    base = tmp_path / "base"
    docs = base / "docs"
    (docs / "deep" / "er").mkdir(parents=True)
    (docs / "top.txt").write_bytes(b"top\n")
    (docs / "deep" / "er" / "Ünïcode name.txt").write_bytes("ünï\n".encode())
    (docs / "deep" / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")

    def keys(db: str) -> dict[str, bytes]:
        with Archive(db) as arc:
            return archive_state(arc)

    pairs = [
        (["ingest", "--root", str(base), str(docs)], ["watch", "--root", str(base), str(docs)]),
        (["ingest", "--root", str(docs), str(docs)], ["watch", str(docs)]),
    ]
    for n, (ingest, watch) in enumerate(pairs):
        by_ingest, by_watch = f"sqlite:///{tmp_path}/i{n}.db", f"sqlite:///{tmp_path}/w{n}.db"
        assert run_cli(*ingest, db=by_ingest, cwd=tmp_path).returncode == 0
        result = run_cli(*watch, "--once", db=by_watch, cwd=tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        assert keys(by_ingest) == keys(by_watch)
        assert len(keys(by_watch)) == 3


def test_watched_folder_deleted_and_recreated(tmp_path, daemons):
    """Deleting the watched folder records its documents' deletions and ends its watch; the
    daemon keeps running, watches the folder again once it exists, and records what is in it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes(b"a\n")
    db = f"sqlite:///{tmp_path / 'archive.db'}"
    daemon = daemons(db, docs, "--debounce", DEBOUNCE).ready()
    arc = Archive(db)
    wait_in_sync(arc, docs, logs=[daemon])
    shutil.rmtree(docs)
    wait_for(lambda: arc.live_keys() == [], "the deletion", logs=[daemon])
    daemon.wait_log("no such folder")  # the supervisor noticed, and waits for the folder
    docs.mkdir()
    (docs / "b.txt").write_bytes(b"b, in the new folder\n")
    wait_in_sync(arc, docs, logs=[daemon])
    wait_for(
        lambda: daemon.log().count("restarting notifications") == 2, "watching again", logs=[daemon]
    )
    (docs / "b.txt").write_bytes(b"b, changed: notifications work again\n")
    wait_in_sync(arc, docs, logs=[daemon])
    assert daemon.stop() == 0
    assert_clean_histories(arc)
    arc.close()


def test_a_folder_and_a_database_reached_through_symlinks(tmp_path, daemons):
    """Watching a symlink to a folder follows the folder itself (native notifications
    watch a symlink, not its target), and no symlinked folder below it (a cycle would never
    end); an archive opened through a symlink to a database
    inside the folder never records its own -wal and -shm, whose names SQLite takes from
    the target."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "loop").symlink_to(".")  # a cycle: symlinked folders below are not followed
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "db.lnk").symlink_to(real / "arch.db")
    db = str(tmp_path / "db.lnk")
    daemon = daemons(db, tmp_path / "link", "--debounce", DEBOUNCE, "--rescan", "0").ready()
    arc = Archive(db)
    expected = {}
    for n in range(5):
        (real / f"f{n}.txt").write_bytes(b"version %d\n" % n)
        expected[f"f{n}.txt"] = b"version %d\n" % n
        time.sleep(0.1)
    wait_for(lambda: archive_state(arc) == expected, "the files written after start-up",
             logs=[daemon])
    time.sleep(1.0)  # the WAL keeps changing while the daemon commits: none is recorded
    assert daemon.stop() == 0
    assert archive_state(arc) == expected
    arc.close()


def test_the_start_up_guard_counts_only_what_reconciling_would_delete(tmp_path):
    """The guard against the wrong folder refuses only when reconciling a folder would
    delete every document archived under its keys: ignored names do not count, nor does a
    folder among several that still holds its documents (the emptied one is refused, by
    name), and its message's remedy works as written."""
    def watch(*args: str):
        return run_cli("watch", *args, "--once", db=db, cwd=tmp_path)

    db = str(tmp_path / "g.db")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "run.log").write_bytes(b"log\n")
    assert watch("d").returncode == 0
    assert watch("d", "--ignore", "*.log").returncode == 0  # run.log cannot be deleted by it
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.txt").write_bytes(name.encode())
    assert watch("m1", "m2", "--root", ".").returncode == 0
    (tmp_path / "m2" / "m2.txt").unlink()
    refused = watch("m1", "m2", "--root", ".")
    assert refused.returncode == 2 and "m2" in refused.stderr.decode()
    remedy = re.search(r"`(archive ingest [^`]+)`", refused.stderr.decode()).group(1)
    done = run_cli(*remedy.split()[1:], db=db, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert watch("m1", "m2", "--root", ".").returncode == 0
    with Archive(db) as arc:
        assert arc.history("m2/m2.txt")[-1].type == "deleted"
        assert arc.show("m1/m1.txt").data == b"m1"


def test_a_folder_outside_the_root_through_a_symlink_keeps_ingests_keys(tmp_path):
    """`watch --root R R/link`, the link leading out of R, gives the keys `ingest --root R
    R/link` gives; and documents that live only under a symlinked folder are present for
    the start-up guard, as they are for reconciling."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere" / "notes"
    root.mkdir()
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.txt").write_bytes(b"hi\n")
    (root / "notes").symlink_to(elsewhere)
    db = str(tmp_path / "s.db")
    assert run_cli("ingest", "--root", str(root), str(root / "notes"), db=db).returncode == 0
    for args in (["--root", str(root), str(root / "notes")], [str(root)]):
        done = run_cli("watch", *args, "--once", db=db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    with Archive(db) as arc:
        assert [(ev.key, ev.type) for ev in arc.log()] == [("notes/a.txt", "created")]
