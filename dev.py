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
import subprocess
import sys
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


def demo() -> None:
    """The main job: replay the seeds' timeline into a fresh SQLite archive, then show the
    history of article 000, its text around the 12:30AM PT update, the diff of the update,
    a point-in-time export and a verification."""
    ensure_env()
    if DEMO.exists():
        shutil.rmtree(DEMO)
    docs = (DEMO / "docs").relative_to(ROOT)
    (ROOT / docs).mkdir(parents=True)
    db = "demo/archive.db"
    os.environ["ARCHIVE_DB"] = str(ROOT / db)
    sys.path.insert(0, str(ROOT))
    from archive.timeline import load

    print(f"Replaying seeds/timeline.json into {db}", flush=True)
    for step in load(ROOT / "seeds" / "timeline.json"):
        (ROOT / docs / step.key).write_bytes(step.data)
        archive("ingest", "--root", str(docs), "--at", step.at, str(docs / step.key))
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
