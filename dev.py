#!/usr/bin/env python3
"""The project's two set-up commands, for a machine with only Python 3.11 and pip:

    python3 dev.py demo   # install into .venv, replay the seeds timeline, show what changed
    python3 dev.py test   # install into .venv, run ruff and the whole test suite

Written in Python rather than make or a shell script, so it needs nothing else.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
DEMO = ROOT / "demo"
ARTICLE = "000_3ac9f82c1f93d425.txt"


def ensure_env() -> None:
    """Create .venv and install the project with its test tools, once per pyproject change."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be run by an older python3
        sys.exit("archive needs Python 3.11 or newer")
    if not PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    stamp = VENV / ".archive-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(wanted)


def archive(*args: str, check: bool = True) -> int:
    """Run the real command line, echoing it as a user would type it."""
    print(f"\n$ archive {' '.join(args)}", flush=True)
    done = subprocess.run([str(BIN / "archive"), *args], cwd=ROOT)
    if check and done.returncode != 0:
        sys.exit(f"archive {args[0]} failed with exit code {done.returncode}")
    return done.returncode


def wait_for(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def archived_sha(key: str) -> str | None:
    done = subprocess.run([str(BIN / "archive"), "show", key], cwd=ROOT, capture_output=True)
    return hashlib.sha256(done.stdout).hexdigest() if done.returncode == 0 else None


def demo() -> None:
    """The main job: the watcher daemon records the seeds' timeline as it is written into a
    fresh folder (each version with its timeline time as mtime); then the history of article
    000, its text around the 12:30AM PT update, the diff of that update, a point-in-time
    export and a verification."""
    ensure_env()
    if DEMO.exists():
        shutil.rmtree(DEMO)
    docs = DEMO / "docs"
    docs.mkdir(parents=True)
    os.environ["ARCHIVE_DB"] = str(DEMO / "archive.db")
    sys.path.insert(0, str(ROOT))
    from datetime import datetime

    from archive.timeline import load

    log_path = DEMO / "watch.log"
    command = ["watch", "demo/docs", "--effective-time", "mtime", "--debounce", "0.2"]
    print(f"$ archive {' '.join(command)} 2> demo/watch.log &", flush=True)
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([str(BIN / "archive"), *command], cwd=ROOT, stderr=log)
    try:
        wait_for("the daemon to start", lambda: "files checked" in log_path.read_text())
        for step in load(ROOT / "seeds" / "timeline.json"):
            # Write aside, stamp the timeline's time, then rename into place (an atomic save):
            # the daemon never sees the bytes with the wrong mtime.
            staging = docs / f".{step.key}.part"
            staging.write_bytes(step.data)
            stamp = datetime.fromisoformat(step.at).timestamp()
            os.utime(staging, (stamp, stamp))
            os.replace(staging, docs / step.key)
            sha = hashlib.sha256(step.data).hexdigest()
            print(f"wrote {step.key} as of {step.at} ({len(step.data)} bytes)", flush=True)
            wait_for(f"{step.key} to be recorded", lambda k=step.key, h=sha: archived_sha(k) == h)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
    print(f"$ kill -TERM %1   # the daemon commits what is pending and exits {code}")
    print(log_path.read_text().rstrip())
    if code != 0:
        sys.exit(f"the watcher exited with {code}")
    archive("history", ARTICLE)
    archive("show", ARTICLE, "--at", "2020-01-03T00:29:00-08:00")
    archive("show", ARTICLE, "--at", "2020-01-03T00:31:00-08:00")
    archive("diff", ARTICLE, "--no-color")
    archive("export", "--at", "2020-01-03T00:00-08:00", "--force")
    archive("verify")


def test() -> None:
    """ruff, then the whole pytest suite (PostgreSQL tests run when ARCHIVE_TEST_PG_URL is
    set, and say why they skip when it is not)."""
    ensure_env()
    lint = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT)
    tests = subprocess.run([str(PYTHON), "-m", "pytest", *sys.argv[2:]], cwd=ROOT)
    sys.exit(lint.returncode or tests.returncode)


if __name__ == "__main__":
    commands = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python3 dev.py demo | test [pytest options]")
    commands[sys.argv[1]]()
