"""The command line of issue 2, through the real command (`python -m archive`), on a SQLite file
and on a fresh PostgreSQL database: every command, its flags, its output and its exit codes.

Archives are mostly prepared through the library (fast, exact effective times) and then read
and checked through the command; every command is also exercised for writing where it writes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import copy_stored_blob, raw_sql, run_cli
from sqlalchemy import make_url

from archive import Archive, NotFound

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "seeds"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STATUS = re.compile(r"^(created|modified|unchanged|deleted)\s+(\S.*)$")


# -- helpers -----------------------------------------------------------------------------------


def us(moment: str) -> int:
    dt = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    assert dt.tzinfo is not None
    return (dt - EPOCH) // timedelta(microseconds=1)


def parse_shown(text: str) -> datetime:
    """A time as the command shows it (ISO 8601), as an aware datetime."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.tzinfo is not None, f"{text!r} has no offset"
    return moment


def utc_shown(text: str) -> datetime:
    """A time shown by default: must be UTC."""
    moment = parse_shown(text)
    assert moment.utcoffset() == timedelta(0), f"{text!r} is not UTC"
    return moment


def sha_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dialect(db_url: str) -> str:
    return make_url(db_url).get_backend_name()


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr.decode(errors="replace"))
    assert b"Traceback" not in result.stderr
    return result.stdout.decode("utf-8")


def fails(result: subprocess.CompletedProcess, code: int) -> str:
    """The command failed with `code`, said why on standard error, and printed no traceback."""
    err = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == code, (result.returncode, err, result.stdout[:300])
    assert "Traceback" not in err
    assert err.strip(), "no message on standard error"
    return err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message, got {err!r}"
    return lines[0]


def ingest_lines(stdout: str) -> dict[str, str]:
    """key -> status from `ingest` output; exactly one line per document."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        match = STATUS.match(line.strip())
        assert match, f"unexpected ingest line {line!r}"
        status, key = match.groups()
        assert key not in found, f"two lines for {key}"
        found[key] = status
    return found


def run_env(*args: str, cwd, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the command with exactly these extra environment variables (ARCHIVE_DB allowed)."""
    full = {k: v for k, v in os.environ.items() if k not in ("ARCHIVE_DB", "ARCHIVE_DEBUG")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "archive", *args],
        cwd=cwd, capture_output=True, env=full, timeout=120,
    )


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by its /-separated relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def seed(name: str) -> bytes:
    return next(SEEDS.glob(f"{name}_*.txt")).read_bytes()


def timeline() -> list[tuple[str, str, bytes]]:
    plan = json.loads((SEEDS / "timeline.json").read_text())
    steps = []
    for step in plan["steps"]:
        whole = (SEEDS / step["doc"]).read_bytes()
        lines = whole.splitlines(keepends=True)
        if "lines" in step:
            data = b"".join(b"".join(lines[a - 1 : b]) for a, b in step["lines"])
        else:
            data = whole
        steps.append((step["at"], step["doc"], data))
    return steps


@pytest.fixture
def lib(db_url):
    """The library on the archive under test, to prepare state quickly."""
    with Archive(db_url) as archive:
        yield archive


# -- init and the database choice ---------------------------------------------------------------


def test_reading_commands_refuse_a_missing_archive_writing_ones_create_it(db_url, tmp_path):
    """A mistyped --db is an error for a command that only reads (it creates nothing); init
    and the commands that record create the archive."""
    reads = [
        ["show", "a.txt"], ["history", "a.txt"], ["diff", "a.txt"], ["log"], ["stats"],
        ["verify"], ["export", "--at", "2020-01-01", "--out", str(tmp_path / "x")],
    ]
    for args in reads:
        assert "no archive at" in one_line(fails(run_cli(*args, db=db_url, cwd=tmp_path), 2))
    batch = run_cli("show", "--batch", db=db_url, cwd=tmp_path, input=b"a.txt\t\n")
    assert "no archive at" in one_line(fails(batch, 2))
    if dialect(db_url) == "sqlite":
        assert not Path(make_url(db_url).database).exists()
    assert not (tmp_path / "x").exists()
    write(tmp_path / "a.txt", b"a\n")
    ok(run_cli("ingest", "a.txt", db=db_url, cwd=tmp_path))  # a missing archive: created
    assert ok(run_cli("show", "a.txt", db=db_url, cwd=tmp_path)) == "a\n"
    ok(run_cli("init", db=db_url, cwd=tmp_path))  # already there: nothing to do, still fine
    from archive.store import HEAD

    with Archive(db_url) as arc:
        assert arc.store.revision() == HEAD


def test_db_as_path_url_env_and_default(tmp_path):
    work = tmp_path / "work"
    write(work / "doc.txt", b"hello\n")
    (work / "data").mkdir()
    # --db as a relative path: a SQLite file relative to the current directory
    lines = ingest_lines(ok(run_env("--db", "data/my.db", "ingest", "doc.txt", cwd=work, env={})))
    assert lines == {"doc.txt": "created"}
    assert (work / "data" / "my.db").is_file()
    # the same archive as a URL, and through ARCHIVE_DB (as a path and as a URL)
    url = f"sqlite:///{work / 'data' / 'my.db'}"
    assert ok(run_env("--db", url, "show", "doc.txt", cwd=tmp_path, env={})) == "hello\n"
    env_path = {"ARCHIVE_DB": str(work / "data" / "my.db")}
    assert ok(run_env("show", "doc.txt", cwd=tmp_path, env=env_path)) == "hello\n"
    assert ok(run_env("show", "doc.txt", cwd=tmp_path, env={"ARCHIVE_DB": url})) == "hello\n"
    # no --db, no ARCHIVE_DB: archive.db in the current directory
    assert not (work / "archive.db").exists()
    write(work / "doc.txt", b"changed\n")
    lines = ingest_lines(ok(run_env("ingest", "doc.txt", cwd=work, env={})))
    assert lines == {"doc.txt": "created"}
    assert (work / "archive.db").is_file()
    with Archive(str(work / "archive.db")) as arc:
        assert arc.show("doc.txt").data == b"changed\n"
    # SQLite archives are in WAL mode
    conn = sqlite3.connect(work / "archive.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        conn.close()


def test_sqlite_read_only_uri_reads_and_refuses_writes_in_one_line(tmp_path):
    """SQLAlchemy's read-only form (`sqlite:///file:PATH?mode=ro&uri=true`) reads the
    archive; a write is one line (exit 2) and changes nothing. URL options SQLite would
    silently ignore, or a URI form without `file:`, are errors rather than another file."""
    db = tmp_path / "ro.db"
    write(tmp_path / "doc.txt", b"kept\n")
    ok(run_cli("ingest", "doc.txt", db=str(db), cwd=tmp_path))
    ro = f"sqlite:///file:{db}?mode=ro&uri=true"
    assert ok(run_cli("show", "doc.txt", db=ro, cwd=tmp_path)) == "kept\n"
    write(tmp_path / "doc.txt", b"changed\n")
    assert "readonly" in one_line(fails(run_cli("ingest", "doc.txt", db=ro, cwd=tmp_path), 2))
    for bad in (f"sqlite:///{db}?mode=ro", f"sqlite:///{db}?mode=ro&uri=true"):
        one_line(fails(run_cli("show", "doc.txt", db=bad, cwd=tmp_path), 2))
    assert not [p.name for p in tmp_path.iterdir() if "?" in p.name]  # none named by options
    assert ok(run_cli("show", "doc.txt", db=str(db), cwd=tmp_path)) == "kept\n"
    assert "ok:" in ok(run_cli("verify", db=str(db), cwd=tmp_path))


def test_postgresql_url_by_flag_and_env(pg_url, tmp_path):
    write(tmp_path / "p.txt", b"on postgres\n")
    assert ingest_lines(ok(run_cli("ingest", "p.txt", db=pg_url, cwd=tmp_path))) == {
        "p.txt": "created"
    }
    out = run_env("show", "p.txt", cwd=tmp_path, env={"ARCHIVE_DB": pg_url})
    assert ok(out) == "on postgres\n"
    assert not (tmp_path / "archive.db").exists()


def test_unsupported_database_url_is_bad_input(tmp_path):
    err = fails(run_cli("init", db="mysql://user@localhost/x", cwd=tmp_path), 2)
    one_line(err)


# -- schema through the command ------------------------------------------------------------------


def test_empty_database_file_is_upgraded_by_any_command(tmp_path):
    db = tmp_path / "empty.db"
    db.write_bytes(b"")
    write(tmp_path / "a.txt", b"a")
    assert ingest_lines(ok(run_cli("ingest", "a.txt", db=str(db), cwd=tmp_path))) == {
        "a.txt": "created"
    }


def test_newer_schema_is_refused_with_exit_2(db_url, lib, tmp_path):
    lib.record("x.txt", b"x")
    lib.close()
    raw_sql(db_url, "UPDATE alembic_version SET version_num = 'zz9999_future'")
    for args in (("show", "x.txt"), ("init",)):
        err = one_line(fails(run_cli(*args, db=db_url, cwd=tmp_path), 2))
        assert "zz9999_future" in err
        assert "newer" in err.lower()


# -- ingest --------------------------------------------------------------------------------------


def test_ingest_keys_relative_to_root_or_cwd_with_slashes(db_url, lib, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.txt", b"A\n")
    write(docs / "sub" / "deeper" / "b.txt", b"B\r\n")
    write(docs / "فارسی" / "ü naïve.txt", "متن\n".encode())
    out = ok(run_cli("ingest", "docs", "--root", "docs", db=db_url, cwd=tmp_path))
    assert ingest_lines(out) == {
        "a.txt": "created",
        "sub/deeper/b.txt": "created",
        "فارسی/ü naïve.txt": "created",
    }
    # default root: the current directory
    out = ok(run_cli("ingest", "docs/sub", db=db_url, cwd=tmp_path))
    assert ingest_lines(out) == {"docs/sub/deeper/b.txt": "created"}
    out = ok(run_cli("ingest", ".", db=db_url, cwd=docs))
    assert ingest_lines(out) == {
        "a.txt": "unchanged",
        "sub/deeper/b.txt": "unchanged",
        "فارسی/ü naïve.txt": "unchanged",
    }
    assert lib.show("sub/deeper/b.txt").data == b"B\r\n"
    assert lib.show("docs/sub/deeper/b.txt").data == b"B\r\n"
    assert lib.show("فارسی/ü naïve.txt").data == "متن\n".encode()


def test_ingest_statuses_one_line_per_document_and_deletions(db_url, lib, tmp_path):
    root = tmp_path / "root"
    write(root / "keep" / "k.txt", b"keep\n")
    write(root / "sub" / "s1.txt", b"one\n")
    write(root / "sub" / "s2.txt", b"two\n")
    write(root / "sub" / "s3.txt", b"three\n")
    assert set(ingest_lines(ok(run_cli("ingest", ".", db=db_url, cwd=root))).values()) == {
        "created"
    }
    (root / "sub" / "s1.txt").unlink()
    (root / "keep" / "k.txt").unlink()
    write(root / "sub" / "s2.txt", b"two, edited\n")
    # without --deletions, a missing file is not a deletion
    out = ok(run_cli("ingest", "sub", db=db_url, cwd=root))
    assert ingest_lines(out) == {"sub/s2.txt": "modified", "sub/s3.txt": "unchanged"}
    assert lib.show("sub/s1.txt").data == b"one\n"
    # with --deletions: only documents under the given folders
    out = ok(run_cli("ingest", "sub", "--deletions", db=db_url, cwd=root))
    assert ingest_lines(out) == {
        "sub/s1.txt": "deleted",
        "sub/s2.txt": "unchanged",
        "sub/s3.txt": "unchanged",
    }
    assert lib.history("sub/s1.txt")[-1].type == "deleted"
    assert lib.show("keep/k.txt").data == b"keep\n"
    fails(run_cli("show", "sub/s1.txt", db=db_url, cwd=root), 3)
    # a deletion is recorded once
    out = ok(run_cli("ingest", "sub", "--deletions", db=db_url, cwd=root))
    assert ingest_lines(out) == {"sub/s2.txt": "unchanged", "sub/s3.txt": "unchanged"}


def test_ingest_path_outside_root_is_refused(db_url, lib, tmp_path):
    write(tmp_path / "root" / "in.txt", b"in")
    write(tmp_path / "elsewhere" / "out.txt", b"out")
    for args in (
        ("ingest", "root/in.txt", "elsewhere/out.txt", "--root", "root"),
        ("ingest", str(tmp_path / "elsewhere"), "--root", "root"),
    ):
        err = fails(run_cli(*args, db=db_url, cwd=tmp_path), 2)
        assert "out" in one_line(err)
    assert lib.log() == []  # nothing was recorded


def test_ingest_at_backfills(db_url, lib, tmp_path):
    write(tmp_path / "n.txt", b"morning edition\n")
    before = datetime.now(UTC)
    ok(run_cli("ingest", "n.txt", "--at", "2020-01-02T10:00:00Z", db=db_url, cwd=tmp_path))
    write(tmp_path / "n.txt", b"dawn edition\n")
    out = ok(run_cli("ingest", "n.txt", "--at", "2020-01-02T06:00:00Z", db=db_url, cwd=tmp_path))
    # before 10:00 the document did not exist: this version is a new event (its creation)
    assert ingest_lines(out) in ({"n.txt": "created"}, {"n.txt": "modified"})
    rows = json.loads(ok(run_cli("history", "n.txt", "--json", db=db_url, cwd=tmp_path)))
    assert [utc_shown(r["effective_at"]) for r in rows] == [
        datetime(2020, 1, 2, 10, tzinfo=UTC),
        datetime(2020, 1, 2, 6, tzinfo=UTC),
    ]
    assert all(utc_shown(r["recorded_at"]) >= before - timedelta(seconds=1) for r in rows)
    assert lib.show("n.txt", at="2020-01-02T07:00:00Z").data == b"dawn edition\n"
    assert lib.show("n.txt").data == b"morning edition\n"
    # without --at, the effective time is now
    write(tmp_path / "n.txt", b"evening edition\n")
    ok(run_cli("ingest", "n.txt", db=db_url, cwd=tmp_path))
    latest = lib.history("n.txt")[-1]
    assert abs(latest.effective_at - latest.recorded_at) < 120_000_000
    assert lib.show("n.txt").data == b"evening edition\n"


def test_ingest_never_ingests_the_archive_database(tmp_path):
    folder = tmp_path / "folder"
    write(folder / "real.txt", b"real\n")
    write(folder / "nested" / "n.txt", b"nested\n")
    ok(run_cli("init", db="archive.db", cwd=folder))
    # while another connection is open, the -wal and -shm files exist; an empty -journal too
    holder = sqlite3.connect(folder / "archive.db")
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("SELECT count(*) FROM sqlite_master").fetchall()
        (folder / "archive.db-journal").write_bytes(b"")
        assert (folder / "archive.db-wal").exists()
        expected = {"real.txt": "created", "nested/n.txt": "created"}
        out = ok(run_cli("ingest", ".", db="archive.db", cwd=folder))
        assert ingest_lines(out) == expected
        # the same database named as a URL, from elsewhere, with another root
        url = f"sqlite:///{folder / 'archive.db'}"
        out = ok(run_cli("ingest", "folder", "--root", "folder", db=url, cwd=tmp_path))
        assert ingest_lines(out) == {"real.txt": "unchanged", "nested/n.txt": "unchanged"}
        # and through a roundabout path
        out = ok(run_cli("ingest", ".", db="nested/../archive.db", cwd=folder))
        assert ingest_lines(out) == {"real.txt": "unchanged", "nested/n.txt": "unchanged"}
    finally:
        holder.close()
    with Archive(str(folder / "archive.db")) as arc:
        assert arc.live_keys() == ["nested/n.txt", "real.txt"]


def test_ingest_non_utf8_file_name_is_refused_or_kept_reversibly(db_url, lib, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "fine.txt", b"fine\n")
    bad = os.fsencode(docs) + b"/caf\xe9-latin1.txt"
    with open(bad, "wb") as handle:
        handle.write(b"latin-1 name\n")
    result = run_cli("ingest", "docs", "--root", "docs", db=db_url, cwd=tmp_path)
    if result.returncode == 2:
        err = one_line(fails(result, 2))
        assert "utf-8" in err.lower() or "utf8" in err.lower()
        assert "caf" in err
        return
    # kept reversibly: the key gives back the original name's bytes
    out = ok(result)
    keys = [k for k in ingest_lines(out) if k != "fine.txt"]
    assert len(keys) == 1
    key = keys[0]
    assert "\ufffd" not in key  # not mangled into replacement characters
    assert os.fsencode(key) == b"caf\xe9-latin1.txt" or key.encode(
        "utf-8", "surrogateescape"
    ) == b"caf\xe9-latin1.txt"
    assert lib.show(key).data == b"latin-1 name\n"


def test_ingest_accepts_any_utf8_file_name(db_url, lib, tmp_path):
    # a backslash, a leading dot, spaces and quotes are ordinary characters in POSIX names
    names = ["notes\\2020.txt", ".hidden", "with space 'quoted'.txt"]
    for name in names:
        write(tmp_path / "docs" / name, name.encode())
    out = ok(run_cli("ingest", "docs", "--root", "docs", db=db_url, cwd=tmp_path))
    assert ingest_lines(out) == {name: "created" for name in names}
    for name in names:
        assert lib.show(name).data == name.encode()


def test_ingest_missing_path_is_bad_input(db_url, tmp_path):
    one_line(fails(run_cli("ingest", "no-such-file.txt", db=db_url, cwd=tmp_path), 2))


# -- history -------------------------------------------------------------------------------------


def _story(lib) -> list[bytes]:
    v1 = b"The first line of the story.\n"
    v2 = v1 + "خط دو\n".encode()  # appended: 6 characters, 10 bytes
    v3 = b"The FIRST line of the story.\n" + "خط دو\n".encode()  # edited in place
    v4 = v1  # back to version 1
    for i, data in enumerate((v1, v2, v3, v4)):
        lib.record("story.txt", data, at=f"2020-01-02T1{i}:00:00Z")
    lib.delete("story.txt", at="2020-01-02T14:00:00Z")
    return [v1, v2, v3, v4]


def test_history_text(db_url, lib, tmp_path):
    versions = _story(lib)
    out = ok(run_cli("history", "story.txt", db=db_url, cwd=tmp_path))
    rows = [line for line in out.splitlines() if re.match(r"^\s*[1-5]\s", line)]
    assert len(rows) == 5, out
    for n, (row, data) in enumerate(zip(rows, versions, strict=False), start=1):
        assert re.match(rf"^\s*{n}\s", row)
        assert sha_hex(data)[:8] in row  # short hash
        assert re.search(rf"\b{len(data)}\b", row)  # size
    assert "created" in rows[0]
    assert "modified" in rows[1] and "modified" in rows[2] and "modified" in rows[3]
    assert "deleted" in rows[4]
    assert "2020-01-02T10:00:00" in rows[0] and "2020-01-02T13:00:00" in rows[3]
    # what changed: characters (not bytes) added and removed, appended or edited in place
    assert "append" in rows[1].lower()
    assert re.search(r"\+\s?6\b|\b6 added|added:? 6\b", rows[1]), rows[1]
    assert not re.search(r"\+\s?10\b", rows[1])
    assert "edit" in rows[2].lower() and "append" not in rows[2].lower()
    # reverts are named
    assert re.search(r"revert\w*\W+(to\W+)?(v|version\s*)?1\b", rows[3].lower()), rows[3]
    assert "revert" not in rows[2].lower()


def test_history_json(db_url, lib, tmp_path):
    versions = _story(lib)
    rows = json.loads(ok(run_cli("history", "story.txt", "--json", db=db_url, cwd=tmp_path)))
    assert isinstance(rows, list) and len(rows) == 5
    for row in rows:
        assert {"seq", "type", "effective_at", "recorded_at", "sha256", "size"} <= set(row)
        utc_shown(row["recorded_at"])
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["type"] for r in rows] == ["created", "modified", "modified", "modified", "deleted"]
    assert [r["sha256"] for r in rows[:4]] == [sha_hex(v) for v in versions]
    assert [r["size"] for r in rows[:4]] == [len(v) for v in versions]
    assert rows[4]["sha256"] is None and rows[4]["size"] == 0
    assert [utc_shown(r["effective_at"]) for r in rows] == [
        datetime(2020, 1, 2, h, tzinfo=UTC) for h in (10, 11, 12, 13, 14)
    ]


def test_history_follows_a_rename_from_either_name(db_url, lib, tmp_path):
    lib.record("old.txt", b"content\n", at="2020-01-02T10:00:00Z")
    lib.rename("old.txt", "new.txt", at="2020-01-02T11:00:00Z")
    old = json.loads(ok(run_cli("history", "old.txt", "--json", db=db_url, cwd=tmp_path)))
    assert [r["type"] for r in old] == ["created", "renamed"]
    assert [r["seq"] for r in old] == [e.seq for e in lib.history("new.txt")]
    assert old[1]["sha256"] == old[0]["sha256"]


# -- show ----------------------------------------------------------------------------------------


def test_show_exact_bytes_at_time_and_version(db_url, lib, tmp_path):
    v1 = "\ufeffFirst, with a BOM and CRLF\r\nسلام 👋🏽\r\n".encode()
    v2 = b"\x00\x01binary\xff\xfe\r\n\x00"  # not UTF-8
    lib.record("s.bin", v1, at="2020-01-02T10:00:00Z")
    lib.record("s.bin", v2, at="2020-01-02T11:00:00Z")
    lib.delete("s.bin", at="2020-01-02T12:00:00Z")

    def show(*args):
        return run_cli("show", "s.bin", *args, db=db_url, cwd=tmp_path)

    assert show("--at", "2020-01-02T11:00:00Z").stdout == v2  # inclusive
    assert show("--at", "2020-01-02T10:59:59.999999Z").stdout == v1
    assert show("--version", "1").stdout == v1
    for args in (
        ("--at", "2020-01-02T09:59:59Z"),  # did not exist yet
        ("--at", "2020-01-02T12:00:00Z"),  # deleted
    ):
        result = show(*args)
        one_line(fails(result, 3))
        assert result.stdout == b""
    result = run_cli("show", "unknown.txt", db=db_url, cwd=tmp_path)
    assert "unknown.txt" in one_line(fails(result, 3))
    fails(show("--at", "2020-01-02T11:00:00Z", "--version", "1"), 2)


def _batch_answers(out: bytes) -> list[tuple[str, str, bytes | None]]:
    """Parse `show --batch` output: (key, sha256 hex or "missing", bytes or None)."""
    answers, pos = [], 0
    while pos < len(out):
        end = out.index(b"\n", pos)
        words = out[pos:end].decode().split(" ")
        pos = end + 1
        if words[-1] == "missing" and len(words) == 2:
            answers.append((words[0], "missing", None))
            continue
        sha_hex, size, key = words[0], int(words[1]), " ".join(words[2:])
        data = out[pos : pos + size]
        assert out[pos + size : pos + size + 1] == b"\n"
        pos += size + 1
        answers.append((key, sha_hex, data))
    return answers


def test_show_batch_answers_every_line_like_show(db_url, lib, tmp_path):
    """Each line answered as `show --at` would, whether it is one of a document's first reads
    (one query each) or a later one (its timeline): over 16 reads per document, shuffled,
    before creation, after deletion, back-filled versions, an old name, and --known-at."""
    t0 = datetime(2020, 1, 2, 10, tzinfo=UTC)
    texts = [seed(f"{n:03d}") for n in range(3)]
    lib.record("a.txt", texts[0], at=t0)
    lib.record("a.txt", texts[0] + b"\nUpdate: one\n", at=t0 + timedelta(hours=2))
    lib.record("a.txt", texts[1], at=t0 + timedelta(hours=4))
    lib.delete("a.txt", at=t0 + timedelta(hours=6))
    lib.record("b.txt", texts[2], at=t0 + timedelta(hours=1))
    time.sleep(0.01)
    mark = datetime.now(UTC)
    time.sleep(0.01)
    lib.record("b.txt", texts[2][:500], at=t0 + timedelta(minutes=90))  # back-filled later
    lib.rename("b.txt", "c.txt", at=t0 + timedelta(hours=3))
    times = [t0 + timedelta(minutes=m) for m in range(-30, 8 * 60, 25)]
    rng = random.Random(5)
    requests = [(k, t) for k in ("a.txt", "b.txt", "c.txt", "none.txt") for t in times]
    rng.shuffle(requests)

    def expected(key, t, known=None):
        try:
            return lib.show(key, at=t, known_at=known).data
        except NotFound:
            return None

    for known in (None, mark):
        lines = "".join(f"{k}\t{t.isoformat()}\n" for k, t in requests).encode()
        args = ["show", "--batch"] + (["--known-at", known.isoformat()] if known else [])
        result = run_cli(*args, db=db_url, cwd=tmp_path, input=lines)
        assert result.returncode == 0, result.stderr
        answers = _batch_answers(result.stdout)
        assert len(answers) == len(requests)
        for (key, t), (got_key, sha_hex, data) in zip(requests, answers, strict=True):
            want = expected(key, t, known)
            assert got_key == key
            if want is None:
                assert sha_hex == "missing", (key, t)
            else:
                assert data == want and sha_hex == hashlib.sha256(want).hexdigest(), (key, t)
    bad = run_cli("show", "--batch", db=db_url, cwd=tmp_path, input=b"a.txt\tnot a time\n")
    assert "line 1" in one_line(fails(bad, 2))


def test_show_batch_past_its_held_bytes_answers_the_same(lib, monkeypatch):
    """Past HELD bytes of answers held between resolving a group and writing it, an answer
    is read again when its turn comes: the output is the same bytes, in the same order."""
    import io

    from archive import batch
    from archive.api import Reader

    t0 = datetime(2020, 1, 2, 10, tzinfo=UTC)
    text = seed("001")
    for n in range(6):
        lib.record("a.txt", text[: 400 * (n + 1)], at=t0 + timedelta(hours=n))
    lib.record("b.txt", text[:300], at=t0)
    requests = [("a.txt", n * 50) for n in range(8, 0, -1)] + [("b.txt", 0), ("none.txt", 0)]
    lines = b"".join(
        f"{k}\t{(t0 + timedelta(minutes=m)).isoformat()}\n".encode() for k, m in requests
    )

    def served() -> bytes:
        sink = io.BytesIO()
        assert batch.serve(lib, io.BytesIO(lines), sink, known_at=None) == len(requests)
        return sink.getvalue()

    whole = served()
    again = []
    read_again = Reader.at
    monkeypatch.setattr(Reader, "at", lambda self, *a: again.append(1) or read_again(self, *a))
    assert served() == whole and again == []
    monkeypatch.setattr(batch, "HELD", 1000)  # room for two of the answers at most
    assert served() == whole
    assert len(again) >= 4  # those answers were read again when their turn came
    answers = _batch_answers(whole)
    assert [a[0] for a in answers] == [k for k, _ in requests]
    assert answers[-1][1] == "missing"


def test_show_batch_takes_all_the_lines_waiting_up_to_a_group(tmp_path):
    """Lines already waiting beyond one read of the input (a file here; a pipe with data)
    are taken into one group, up to GROUP lines; the rest, and a last line without its
    newline, follow."""
    from archive import batch

    lines = [f"doc{i % 7}.txt\t2020-01-0{i % 9 + 1}\n".encode() for i in range(5000)]
    source = tmp_path / "lines"
    source.write_bytes(b"".join(lines) + b"last.txt")
    assert source.stat().st_size > batch.CHUNK  # more than one read
    with open(source, "rb") as handle:
        groups = list(batch._groups(handle))
    assert [len(g) for g in groups] == [batch.GROUP, 5000 - batch.GROUP, 1]
    assert [line + b"\n" for g in groups[:2] for line in g] == lines
    assert groups[2] == [b"last.txt"]


def test_show_batch_as_a_co_process_answers_each_line_before_the_next(db_url, lib, tmp_path):
    """A script that writes one line and waits for its answer gets it at once (no deadlock),
    line after line; lines before a bad one are answered before the error ends the run."""
    import selectors

    versions = [seed("000")[: 1000 * (n + 1)] for n in range(4)]
    t0 = datetime(2020, 1, 2, 10, tzinfo=UTC)
    for n, data in enumerate(versions):
        lib.record("a.txt", data, at=t0 + timedelta(hours=n))
    proc = subprocess.Popen(
        [sys.executable, "-m", "archive", "--db", db_url, "show", "--batch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    assert proc.stdin and proc.stdout
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        for n in (3, 0, 2, 1, 3):
            proc.stdin.write(f"a.txt\t{(t0 + timedelta(hours=n)).isoformat()}\n".encode())
            proc.stdin.flush()
            assert selector.select(timeout=30), "no answer to a single line within 30 s"
            header = proc.stdout.readline().split()
            assert header == [sha_hex(versions[n]).encode(), b"%d" % len(versions[n]), b"a.txt"]
            assert proc.stdout.read(len(versions[n]) + 1) == versions[n] + b"\n"
        proc.stdin.write(b"none.txt\t\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"none.txt missing\n"
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    for bad in (b"a.txt\tnot a time\n", b"\xff.txt\t\n"):  # not a time; not UTF-8
        lines = b"a.txt\t2020-01-02T10:30:00Z\n\n" + bad + b"a.txt\t\n"
        result = run_cli("show", "--batch", db=db_url, cwd=tmp_path, input=lines)
        assert "line 3" in one_line(fails(result, 2))
        assert _batch_answers(result.stdout) == [("a.txt", sha_hex(versions[0]), versions[0])]


def test_show_known_at(db_url, lib, tmp_path):
    lib.record("k.txt", b"what we knew\n", at="2020-01-02T10:00:00Z")
    time.sleep(0.01)
    mark = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    lib.record("k.txt", b"learned later\n", at="2020-01-02T09:00:00Z")  # back-filled
    lib.record("k.txt", b"newest\n", at="2020-01-02T11:00:00Z")

    def show(*args):
        return run_cli("show", "k.txt", *args, db=db_url, cwd=tmp_path)

    assert ok(show("--known-at", mark)) == "what we knew\n"
    assert ok(show()) == "newest\n"
    fails(show("--at", "2020-01-02T09:30:00Z", "--known-at", mark), 3)
    assert lib.show("k.txt", at="2020-01-02T09:30:00Z").data == b"learned later\n"


# -- diff ----------------------------------------------------------------------------------------


def _fox(lib):
    lib.record("fox.txt", b"The quick brown fox jumps.\n", at="2020-01-02T10:00:00Z")
    lib.record("fox.txt", b"The quick red fox jumps.\n", at="2020-01-02T11:00:00Z")
    lib.record("fox.txt", b"The quick red fox leaps high.\n", at="2020-01-02T12:00:00Z")


def test_diff_defaults_to_the_last_two_versions(db_url, lib, tmp_path):
    _fox(lib)
    out = ok(run_cli("diff", "fox.txt", db=db_url, cwd=tmp_path))
    assert "leaps" in out and "jumps" in out
    assert "brown" not in out  # version 1 is not involved
    assert "\x1b[" not in out  # no colour when not on a terminal
    out = ok(run_cli("diff", "fox.txt", "--format", "json", db=db_url, cwd=tmp_path))
    document = json.loads(out)
    text = json.dumps(document, ensure_ascii=False)
    assert "leaps" in text and "jumps" in text and "brown" not in text


def test_diff_between_numbers_and_times_in_each_format(db_url, lib, tmp_path):
    _fox(lib)
    words = ok(run_cli("diff", "fox.txt", "1", "2", "--format", "words", db=db_url, cwd=tmp_path))
    assert "brown" in words and "red" in words and "leaps" not in words
    # the unchanged words are shown once, the changed ones marked
    assert words.count("quick") == 1
    unified = ok(
        run_cli(
            "diff", "fox.txt", "2020-01-02T10:30:00Z", "2020-01-02T12:00:00Z",
            "--format", "unified", db=db_url, cwd=tmp_path,
        )
    )
    lines = unified.splitlines()
    assert "-The quick brown fox jumps." in lines
    assert "+The quick red fox leaps high." in lines
    assert any(line.startswith("@@") for line in lines)
    document = json.loads(
        ok(run_cli("diff", "fox.txt", "1", "3", "--format", "json", db=db_url, cwd=tmp_path))
    )
    text = json.dumps(document, ensure_ascii=False)
    assert "brown" in text and "leaps" in text


def test_diff_is_coloured_on_a_terminal(db_url, lib, tmp_path):
    import pty

    _fox(lib)
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "ARCHIVE_DB")}
    env["TERM"] = "xterm-256color"
    master, slave = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "archive", "--db", db_url, "diff", "fox.txt"],
            stdout=slave, stderr=subprocess.PIPE, cwd=tmp_path, env=env, timeout=120,
        )
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    assert result.returncode == 0, result.stderr
    assert b"\x1b[" in shown  # ANSI colour
    assert b"leaps" in shown


def test_diff_unknown_format_is_a_usage_error(db_url, tmp_path):
    fails(run_cli("diff", "fox.txt", "--format", "bogus", db=db_url, cwd=tmp_path), 2)


# -- log -----------------------------------------------------------------------------------------


def test_log_global_order_and_time_window(db_url, lib, tmp_path):
    lib.record("a.txt", b"a1", at="2020-01-02T10:00:00Z")
    lib.record("b.txt", b"b1", at="2020-01-02T11:00:00Z")
    lib.record("a.txt", b"a2", at="2020-01-02T12:00:00Z")
    lib.record("b.txt", b"b0", at="2020-01-02T09:00:00Z")  # back-filled: recorded last
    lib.delete("a.txt", at="2020-01-02T13:00:00Z")
    rows = json.loads(ok(run_cli("log", "--json", db=db_url, cwd=tmp_path)))
    assert [(r["key"], r["seq"]) for r in rows] == [
        ("a.txt", 1), ("b.txt", 1), ("a.txt", 2), ("b.txt", 2), ("a.txt", 3),
    ]
    assert [r["type"] for r in rows][:3] == ["created", "created", "modified"]
    assert rows[3]["type"] in ("created", "modified")  # b0 is older than b1
    assert rows[4]["type"] == "deleted"
    positions = [r["position"] for r in rows]
    assert positions == sorted(positions) and len(set(positions)) == 5
    for row in rows:
        assert {"seq", "type", "effective_at", "recorded_at", "sha256", "size"} <= set(row)
    window = json.loads(
        ok(
            run_cli(
                "log", "--since", "2020-01-02T11:00:00Z", "--until", "2020-01-02T12:00:00Z",
                "--json", db=db_url, cwd=tmp_path,
            )
        )
    )
    assert [(r["key"], r["seq"]) for r in window] == [("b.txt", 1), ("a.txt", 2)]
    since = json.loads(
        ok(run_cli("log", "--since", "2020-01-02T12:00:00Z", "--json", db=db_url, cwd=tmp_path))
    )
    assert [(r["key"], r["seq"]) for r in since] == [("a.txt", 2), ("a.txt", 3)]
    text = ok(run_cli("log", "--until", "2020-01-02T10:00:00Z", db=db_url, cwd=tmp_path))
    assert "a.txt" in text and "b.txt" in text  # 10:00 a1 and 09:00 b0
    assert text.index("a.txt") < text.index("b.txt")  # global order, not time order


# -- export --------------------------------------------------------------------------------------

AT = "2020-01-02T12:00:00Z"


def _corpus(lib) -> dict[str, bytes]:
    """Documents as they stood at AT."""
    lib.record("a.txt", b"alpha\n", at="2020-01-02T10:00:00Z")
    lib.record("sub/dir/b.bin", b"\x00\xffbinary", at="2020-01-02T10:30:00Z")
    lib.record("e.txt", "early سلام\r\n".encode(), at="2020-01-02T11:00:00Z")
    lib.record("e.txt", b"late\n", at="2020-01-02T12:00:01Z")  # after AT
    lib.record("c.txt", b"created after\n", at="2020-01-02T13:00:00Z")
    lib.record("d.txt", b"deleted before\n", at="2020-01-02T09:00:00Z")
    lib.delete("d.txt", at="2020-01-02T11:59:59Z")
    return {
        "a.txt": b"alpha\n",
        "sub/dir/b.bin": b"\x00\xffbinary",
        "e.txt": "early سلام\r\n".encode(),
    }


def _check_manifest(manifest: dict, expected: dict[str, bytes], lib) -> None:
    assert {"at", "known_at", "position", "documents"} <= set(manifest)
    assert utc_shown(manifest["at"]) == parse_shown(AT)
    assert manifest["position"] == max(e.position for e in lib.log())
    documents = {d["key"]: d for d in manifest["documents"]}
    assert set(documents) == set(expected)
    for key, data in expected.items():
        d = documents[key]
        assert {"key", "sha256", "size", "seq", "effective_at"} <= set(d)
        assert d["sha256"] == sha_hex(data) and d["size"] == len(data)
        in_effect = lib.show(key, at=AT).event
        assert d["seq"] == in_effect.seq
        effective = EPOCH + timedelta(microseconds=in_effect.effective_at)
        assert utc_shown(d["effective_at"]) == effective


def test_export_dir_and_force(db_url, lib, tmp_path):
    expected = _corpus(lib)
    ok(run_cli("export", "--at", AT, "--out", "out", db=db_url, cwd=tmp_path))
    files = tree(tmp_path / "out")
    manifest = json.loads(files.pop("MANIFEST.json"))
    assert files == expected  # keys at the top level, no enclosing folder, exact bytes
    _check_manifest(manifest, expected, lib)
    assert manifest["known_at"] is None
    # a non-empty target is refused without --force, and left alone
    write(tmp_path / "out" / "stray.txt", b"stray")
    one_line(fails(run_cli("export", "--at", AT, "--out", "out", db=db_url, cwd=tmp_path), 2))
    assert (tmp_path / "out" / "stray.txt").exists()
    # exports are staged elsewhere and moved into place: nothing else is left beside them
    assert {p.name for p in tmp_path.iterdir() if p.name != "archive.db"} - {
        "archive.db-wal", "archive.db-shm", "archive.db-journal"
    } == {"out"}
    # --force replaces it
    ok(run_cli("export", "--at", AT, "--out", "out", "--force", db=db_url, cwd=tmp_path))
    files = tree(tmp_path / "out")
    files.pop("MANIFEST.json")
    assert files == expected


def test_export_refuses_targets_it_cannot_or_must_not_replace(db_url, lib, tmp_path):
    """Where the file system says no, or the target is a FIFO, a device or the folder the
    command runs in, the export says so in one line (exit 2), and replaces nothing."""
    _corpus(lib)

    def export(*args: str, cwd: Path = tmp_path) -> str:
        result = run_cli("export", "--at", AT, *args, db=db_url, cwd=cwd)
        return one_line(fails(result, 2))

    write(tmp_path / "afile", b"a file, not a folder")
    assert "cannot write export to afile/sub" in export("--out", "afile/sub")
    assert "cannot write export to afile/x.tar" in export("--out", "afile/x.tar", "--format", "tar")
    os.mkfifo(tmp_path / "fifo")
    assert "not a regular file" in export("--out", "fifo", "--format", "tar", "--force")
    assert (tmp_path / "fifo").is_fifo()
    if Path("/dev/null").is_char_device():
        assert "not a regular file" in export("--out", "/dev/null", "--format", "tar", "--force")
        assert Path("/dev/null").is_char_device()
    inside = tmp_path / "old" / "deeper"
    write(inside / "kept.txt", b"kept")
    for target in (".", ".."):
        assert "holds the current folder" in export("--out", target, "--force", cwd=inside)
    assert (inside / "kept.txt").read_bytes() == b"kept"
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["deeper"]  # nothing beside


def test_output_that_cannot_be_written_and_a_reader_that_stops_early(db_url, lib, tmp_path):
    """A full device is one line and exit 2; a reader that closes the pipe early (`| head`)
    ends the command quietly with exit 0, not with damage's exit 1. A key with a tab in it
    is read by --batch up to the line's last tab."""
    lib.record("a.txt", seed("000"), at="2020-01-02T10:00:00Z")
    lib.record("tab\tname.txt", b"tabbed\n", at="2020-01-02T10:00:00Z")
    if Path("/dev/full").exists():
        for args in (["show", "a.txt"], ["log"], ["show", "--batch"]):
            with open("/dev/full", "wb") as full:
                result = subprocess.run(
                    [sys.executable, "-m", "archive", "--db", db_url, *args], cwd=tmp_path,
                    input=b"a.txt\t\n", stdout=full, stderr=subprocess.PIPE, timeout=60,
                )
            assert "No space left on device" in one_line(fails(result, 2))
    proc = subprocess.Popen(
        [sys.executable, "-m", "archive", "--db", db_url, "show", "--batch"], cwd=tmp_path,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    proc.stdin.write(b"a.txt\t\n" * 400)  # 10 MB of answers; the reader takes 10 bytes
    proc.stdin.close()
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    got = run_cli("show", "--batch", db=db_url, cwd=tmp_path, input=b"tab\tname.txt\t\n")
    assert _batch_answers(got.stdout) == [("tab\tname.txt", sha_hex(b"tabbed\n"), b"tabbed\n")]


def test_export_tar_with_known_at(db_url, lib, tmp_path):
    expected = _corpus(lib)
    ok(run_cli("export", "--at", AT, "--format", "tar", "--out", "snap.tar", db=db_url,
               cwd=tmp_path))
    with tarfile.open(tmp_path / "snap.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    manifest = json.loads(members.pop("MANIFEST.json"))
    assert members == expected  # no enclosing folder in the tar either
    _check_manifest(manifest, expected, lib)
    one_line(fails(run_cli("export", "--at", AT, "--format", "tar", "--out", "snap.tar",
                           db=db_url, cwd=tmp_path), 2))
    # what the archive knew before the later documents were recorded
    time.sleep(0.01)
    mark = datetime.now(UTC)
    time.sleep(0.01)
    lib.record("a.txt", b"alpha back-filled\n", at="2020-01-02T11:00:00Z")
    lib.record("z.txt", b"late news\n", at="2020-01-02T08:00:00Z")
    ok(run_cli("export", "--at", AT, "--known-at", mark.isoformat(), "--format", "tar",
               "--out", "snap.tar", "--force", db=db_url, cwd=tmp_path))
    with tarfile.open(tmp_path / "snap.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    manifest = json.loads(members.pop("MANIFEST.json"))
    assert members == expected
    assert abs(utc_shown(manifest["known_at"]) - mark) < timedelta(milliseconds=1)
    assert manifest["position"] == max(e.position for e in lib.log(known_at=mark))
    assert manifest["position"] < max(e.position for e in lib.log())


def test_tar_export_writes_the_bytes_tarfile_would(tmp_path):
    """The export's tar writer gives byte for byte what tarfile's PAX format gives, for
    names that fit a ustar header and for those that need a pax header (non-ASCII, long)."""
    import io

    from archive import export

    members = [
        ("a.txt", b"alpha\n", 1_600_000_000),
        ("news/2020/01/live.txt", b"x" * 513, 0),
        ("empty.txt", b"", 1),
        ("d" * 100, b"a name of exactly 100 bytes", 1_600_000_001),
        ("d" * 101, b"one byte too long", 1_600_000_002),
        ("خبر/گزارش 👍.txt", "متن".encode(), 1_600_000_003),
        ("deep/" * 40 + "x.txt", b"long path", 1_600_000_004),
    ]
    ours = io.BytesIO()
    written = sum(export._member(ours, name, data, mtime) for name, data, mtime in members)
    assert written == len(ours.getvalue())
    theirs = io.BytesIO()
    with tarfile.open(fileobj=theirs, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mtime in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            tar.addfile(info, io.BytesIO(data))
    assert theirs.getvalue().startswith(ours.getvalue())
    assert export._ustar_header("a.txt", 6, 1_600_000_000) is not None
    assert export._ustar_header("d" * 101, 1, 0) is None
    assert export._ustar_header("خبر.txt", 1, 0) is None
    assert export._ustar_header("big", 8**11, 0) is None


def test_export_default_target_under_cwd(db_url, lib, tmp_path):
    expected = _corpus(lib)
    work = tmp_path / "work"
    work.mkdir()
    ok(run_cli("export", "--at", "2020-01-02T04:00:00-08:00", db=db_url, cwd=work))
    snapshots = work / "snapshots"
    entries = list(snapshots.iterdir())
    assert len(entries) == 1 and entries[0].is_dir()
    assert "2020-01-02" in entries[0].name
    files = tree(entries[0])
    assert json.loads(files.pop("MANIFEST.json"))["documents"]
    assert files == expected


# -- verify --------------------------------------------------------------------------------------


def test_verify_clean(db_url, lib, tmp_path):
    _story(lib)
    _fox(lib)
    document = json.loads(ok(run_cli("verify", "--json", db=db_url, cwd=tmp_path)))
    assert isinstance(document, dict)  # plain `verify` on a clean archive: the seeds test


def test_verify_names_the_damaged_event(db_url, lib, tmp_path):
    lib.record("news/fine.txt", b"fine\n", at="2020-01-02T10:00:00Z")
    lib.record("news/damaged.txt", b"one\n", at="2020-01-02T10:00:00Z")
    lib.record("news/damaged.txt", b"two\n", at="2020-01-02T11:00:00Z")
    lib.record("news/damaged.txt", b"three\n", at="2020-01-02T12:00:00Z")
    second = lib.history("news/damaged.txt")[1]
    raw_sql(
        db_url,
        f"UPDATE events SET effective_at = effective_at - 3600000000 "
        f"WHERE position = {second.position}",
        bypass=("events",),
    )
    result = run_cli("verify", db=db_url, cwd=tmp_path)
    fails(result, 1)
    said = result.stderr.decode() + result.stdout.decode()
    assert "news/damaged.txt" in said
    assert re.search(r"\b2\b", said) or str(second.position) in said
    damaged_lines = [line for line in said.splitlines() if "news/fine.txt" in line]
    assert not damaged_lines
    result = run_cli("verify", "--json", db=db_url, cwd=tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert "news/damaged.txt" in json.dumps(report, ensure_ascii=False)


def test_verify_names_the_document_whose_content_is_damaged(db_url, lib, tmp_path):
    lib.record("news/blob.txt", b"A" * 50, at="2020-01-02T10:00:00Z")
    lib.record("news/donor.txt", b"B" * 50, at="2020-01-02T10:00:00Z")
    victim = lib.history("news/blob.txt")[0]
    donor = lib.history("news/donor.txt")[0]
    copy_stored_blob(db_url, into=victim.content_id, source=donor.content_id)
    # reading it fails loudly, with nothing on standard output
    result = run_cli("show", "news/blob.txt", db=db_url, cwd=tmp_path)
    assert result.returncode not in (0, 2, 3)
    assert result.stdout == b""
    one_line(fails(result, result.returncode))
    result = run_cli("verify", db=db_url, cwd=tmp_path)
    fails(result, 1)
    said = result.stderr.decode() + result.stdout.decode()
    assert "news/blob.txt" in said


# -- stats ---------------------------------------------------------------------------------------


def test_stats(db_url, lib, tmp_path):
    a, b = seed("004"), seed("004") + b"\nA correction.\n"
    lib.record("one.txt", a, at="2020-01-02T10:00:00Z")
    lib.record("one.txt", b, at="2020-01-02T11:00:00Z")
    lib.record("one.txt", a, at="2020-01-02T12:00:00Z")  # revert: no new content
    lib.record("two.txt", a, at="2020-01-02T12:00:00Z")  # same content, other document
    stats = json.loads(ok(run_cli("stats", "--json", db=db_url, cwd=tmp_path)))
    assert {"documents", "events", "contents", "raw_bytes", "stored_bytes", "ratio"} <= set(stats)
    assert stats["documents"] == 2
    assert stats["events"] == 4
    assert stats["contents"] == 2
    assert stats["raw_bytes"] == 3 * len(a) + len(b)
    assert 0 < stats["stored_bytes"] < stats["raw_bytes"]
    assert abs(stats["ratio"] - stats["stored_bytes"] / stats["raw_bytes"]) < 0.01
    text = ok(run_cli("stats", db=db_url, cwd=tmp_path))
    assert "4" in text and "2" in text


# -- time ----------------------------------------------------------------------------------------


def test_time_forms_with_offsets_z_naive_local_and_date(db_url, lib, tmp_path):
    lib.record("t.txt", b"07:59", at="2020-01-03T07:59:59.999999Z")
    lib.record("t.txt", b"08:00", at="2020-01-03T08:00:00Z")
    lib.record("t.txt", b"08:30", at="2020-01-03T08:30:00Z")
    lib.record("t.txt", b"tehran midnight", at="2020-01-02T20:30:00Z")

    def window(since: str, until: str, tz: str | None = None) -> list[int]:
        env = {"TZ": tz} if tz else None
        out = run_cli("log", "--json", "--since", since, "--until", until, db=db_url,
                      cwd=tmp_path, env=env)
        return [r["seq"] for r in json.loads(ok(out))]

    # offsets and Z: both ends name exactly 08:30Z
    assert window("2020-01-03T00:30:00-08:00", "2020-01-03T12:00:00+03:30") == [3]
    # naive times are local: TZ is honoured
    assert window("2020-01-03 00:30", "2020-01-03T00:30:00", tz="America/Los_Angeles") == [3]
    # a date alone is local midnight
    assert window("2020-01-03", "2020-01-03T08:00:00Z", tz="America/Los_Angeles") == [2]
    assert window("2020-01-03", "2020-01-02T20:30:00Z", tz="Asia/Tehran") == [4]
    # times are shown in UTC unless --tz says otherwise
    rows = json.loads(ok(run_cli("log", "--json", "--since", "2020-01-03T08:30:00Z", db=db_url,
                                 cwd=tmp_path)))
    assert utc_shown(rows[0]["effective_at"]) == datetime(2020, 1, 3, 8, 30, tzinfo=UTC)
    shown = json.loads(ok(run_cli("--tz", "Asia/Tehran", "log", "--json", db=db_url,
                                  cwd=tmp_path)))
    moment = parse_shown(shown[2]["effective_at"])
    assert moment.utcoffset() == timedelta(hours=3, minutes=30)
    assert moment == datetime(2020, 1, 3, 8, 30, tzinfo=UTC)


def test_unparseable_time_is_a_usage_error_naming_the_accepted_forms(db_url, lib, tmp_path):
    lib.record("x.txt", b"x")
    for args in (
        ("export", "--at", "2020-13-45"),
        ("ingest", "x.txt", "--at", "noon-ish"),
    ):
        err = fails(run_cli(*args, db=db_url, cwd=tmp_path), 2)
        assert "iso 8601" in err.lower()
        assert "date" in err.lower()
        assert "offset" in err.lower() or "Z" in err


def test_usage_errors_are_one_line(db_url, tmp_path):
    for args in (
        ("show", "x.txt", "--at", "next tuesday"),
        ("no-such-command",),
    ):
        one_line(fails(run_cli(*args, db=db_url, cwd=tmp_path), 2))


# -- exit codes ----------------------------------------------------------------------------------


def test_not_found_is_exit_3_with_one_line(db_url, lib, tmp_path):
    lib.record("here.txt", b"here", at="2020-01-02T10:00:00Z")
    for args in (
        ("history", "missing.txt", "--json"),
        ("diff", "missing.txt"),
        ("show", "here.txt", "--at", "2020-01-01"),  # a date alone: before it existed
    ):
        result = run_cli(*args, db=db_url, cwd=tmp_path)
        one_line(fails(result, 3))
        assert result.stdout == b""


# -- the seeds, end to end -----------------------------------------------------------------------


def test_seed_timeline_through_the_command(db_url, lib, tmp_path):
    steps = timeline()
    for at, doc, data in steps:
        lib.record(doc, data, at=at)
    article = "000_3ac9f82c1f93d425.txt"
    update = b"Update: 2020-01-03 12:30AM PT"
    before = run_cli("show", article, "--at", "2020-01-03T00:29:59-08:00", db=db_url,
                     cwd=tmp_path).stdout
    after = run_cli("show", article, "--at", "2020-01-03T00:30:00-08:00", db=db_url,
                    cwd=tmp_path).stdout
    assert update not in before and update in after
    assert after == seed("000")
    assert before == [d for at, doc, d in steps if doc == article][1]
    diff = ok(run_cli("diff", article, db=db_url, cwd=tmp_path))
    assert "Update" in diff and "Rouhani" in diff
    ok(run_cli("export", "--at", "2020-01-03T00:00:00-08:00", db=db_url, cwd=tmp_path))
    (snapshot,) = (tmp_path / "snapshots").iterdir()
    files = tree(snapshot)
    manifest = json.loads(files.pop("MANIFEST.json"))
    cut = us("2020-01-03T00:00:00-08:00")
    expected = {}
    for at, doc, data in steps:
        if us(at) <= cut:
            expected[doc] = data
    assert files == expected
    assert manifest["position"] == len(steps)
    out = ok(run_cli("verify", db=db_url, cwd=tmp_path))
    assert out.strip()


def test_show_batch_stops_at_a_damaged_document_after_the_answers_before_it(
    db_url, lib, tmp_path
):
    """Answers are resolved out of order but written in input order: a damaged document
    ends the run (exit 1, one line naming the content) after the answers to earlier lines,
    never with an answer in its place."""
    lib.record("a.txt", seed("000"), at="2020-01-02T10:00:00Z")
    lib.record("z.txt", b"Z" * 40, at="2020-01-02T10:00:00Z")
    lib.record("b.txt", b"B" * 40, at="2020-01-02T10:00:00Z")
    victim, donor = lib.history("b.txt")[0], lib.history("z.txt")[0]
    copy_stored_blob(db_url, into=victim.content_id, source=donor.content_id)
    lines = b"z.txt\t\nb.txt\t\na.txt\t\n"  # sorted, a.txt is read first and b.txt fails
    result = run_cli("show", "--batch", db=db_url, cwd=tmp_path, input=lines)
    assert f"content {victim.content_id}" in one_line(fails(result, 1))
    assert _batch_answers(result.stdout) == [("z.txt", sha_hex(b"Z" * 40), b"Z" * 40)]


# -- the file system as users have it: symlinks, folders that cannot be listed, typos ------------


def test_the_archive_never_records_its_own_files_through_a_symlinked_folder(tmp_path):
    """Reached through a symlink to the watched folder, the database and its -wal and -shm
    files are still the archive's own: neither ingest nor watch records them."""
    real = tmp_path / "real"
    write(real / "doc.txt", b"a\n")
    (tmp_path / "link").symlink_to(real)
    db = str(tmp_path / "link" / "arch.db")
    for _ in range(2):
        ok(run_cli("ingest", "--root", str(real), str(real), db=db, cwd=tmp_path))
    ok(run_cli("watch", str(real), "--once", db=db, cwd=tmp_path))
    (real / "alias.txt").symlink_to(real / "arch.db")  # a symlink to the database itself
    ok(run_cli("ingest", "--root", str(real), str(real), db=db, cwd=tmp_path))
    ok(run_cli("watch", str(real), "--once", db=db, cwd=tmp_path))
    with Archive(db) as arc:
        assert [ev.key for ev in arc.log()] == ["doc.txt"]


def test_ingest_and_watch_never_record_a_hard_link_to_the_database(tmp_path):
    """A hard link to the database in the folder is the archive's own file by another name:
    neither ingest nor watch --once records it, and the other files are recorded."""
    folder = tmp_path / "folder"
    write(folder / "doc.txt", b"a\n")
    db = str(tmp_path / "arch.db")
    ok(run_cli("init", db=db, cwd=tmp_path))
    os.link(db, folder / "copy.db")
    out = ok(run_cli("ingest", "folder", "--root", "folder", db=db, cwd=tmp_path))
    assert ingest_lines(out) == {"doc.txt": "created"}
    write(folder / "doc.txt", b"b\n")
    ok(run_cli("watch", "folder", "--once", db=db, cwd=tmp_path))
    for named in ("folder/copy.db", "arch.db"):  # named on the command line: refused, say so
        refused = run_cli("ingest", named, "folder/doc.txt", db=db, cwd=tmp_path)
        assert "the archive's own database file" in one_line(fails(refused, 2))
    with Archive(db) as arc:
        assert [ev.key for ev in arc.log()] == ["doc.txt", "doc.txt"]


def test_a_folder_that_cannot_be_listed_is_an_error_not_a_deletion(tmp_path):
    """A folder ingest cannot list (here: a path longer than the system allows) refuses the
    whole ingest in one line, exit 2, and with --deletions records nothing as deleted."""
    docs = tmp_path / "docs"
    write(docs / "a.txt", b"a\n")
    fd = os.open(docs, os.O_RDONLY)
    try:  # built one level at a time, by relative names: no single path is too long
        for level in range(20):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            if level == 0:
                made = os.open("b.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=inner)
                os.write(made, b"b\n")
                os.close(made)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    db = str(tmp_path / "a.db")
    with Archive(db) as arc:
        arc.record("d" * 250 + "/b.txt", b"b\n", at="2020-01-01T00:00:00Z")
    for extra in ([], ["--deletions"]):
        result = run_cli("ingest", "--root", str(docs), str(docs), *extra, db=db, cwd=tmp_path)
        assert "cannot list" in one_line(fails(result, 2))
    with Archive(db) as arc:
        assert [(ev.key, ev.type) for ev in arc.log()] == [("d" * 250 + "/b.txt", "created")]


def test_a_file_that_cannot_be_looked_at_is_an_error_not_skipped(tmp_path):
    """A file in a folder that can be listed, but whose own path is longer than the system
    allows, cannot be looked at: ingest refuses in one line, exit 2, records nothing, and
    with --deletions does not take the archived document for gone."""
    docs = tmp_path / "docs"
    docs.mkdir()
    fd = os.open(docs, os.O_RDONLY)
    depth = len(str(docs))
    try:  # built one level at a time, by relative names: no single path is too long
        while depth < 3900:
            name = "d" * min(250, 3990 - depth)
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, depth = inner, depth + 1 + len(name)
        made = os.open("f" * 200 + ".txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(made, b"far\n")
        os.close(made)
    finally:
        os.close(fd)
    assert depth < 4000 < depth + 205  # the folder can be listed, the file not looked at
    key = str(_deepest(docs).relative_to(docs)) + "/" + "f" * 200 + ".txt"
    db = str(tmp_path / "a.db")
    with Archive(db) as arc:
        arc.record(key, b"far\n", at="2020-01-01T00:00:00Z")
    for extra in ([], ["--deletions"]):
        result = run_cli("ingest", "--root", str(docs), str(docs), *extra, db=db, cwd=tmp_path)
        assert "too long" in one_line(fails(result, 2))
    with Archive(db) as arc:
        assert [(ev.key, ev.type) for ev in arc.log()] == [(key, "created")]


def _deepest(folder: Path) -> Path:
    """The deepest folder under `folder` (a single line of folders)."""
    path = folder
    while inner := [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]:
        path = Path(inner[0].path)
    return path


def test_watch_refuses_folders_that_hold_none_of_its_documents_and_values_it_cannot_use(tmp_path):
    """Pointed at a folder that holds none of the documents archived under its keys, watch
    refuses to start rather than record them all as deleted; an empty or missing folder, or a
    debounce or rescan that is not a number of seconds, is refused before anything is made."""
    write(tmp_path / "docs" / "a.txt", b"a\n")
    write(tmp_path / "other" / "z.txt", b"z\n")
    db = str(tmp_path / "w.db")
    ok(run_cli("watch", "docs", "--once", db=db, cwd=tmp_path))
    refused = run_cli("watch", "other", "--once", db=db, cwd=tmp_path)
    assert "would record them all as deleted" in one_line(fails(refused, 2))
    with Archive(db) as arc:
        assert [(ev.key, ev.type) for ev in arc.log()] == [("a.txt", "created")]
    new = str(tmp_path / "new.db")
    for args in (["nosuch"], [""], ["docs", "--debounce", "inf"], ["docs", "--debounce", "nan"],
                 ["docs", "--rescan", "inf"], ["docs", "--rescan", "nan"]):
        one_line(fails(run_cli("watch", *args, "--once", db=new, cwd=tmp_path), 2))
    one_line(fails(run_cli("ingest", "", db=new, cwd=tmp_path), 2))
    assert not Path(new).exists()


def test_edges_of_times_numbers_streams_and_urls_are_one_line_errors(db_url, lib, tmp_path):
    """Times that UTC cannot hold, a version number past 64 bits, a closed standard output
    or input, URL options the driver cannot use: each a one-line error, exit 2. A time at
    the edge of the calendar is shown in UTC where a zone would carry it past year 9999. An
    empty file is no archive, and a read leaves it empty."""
    lib.record("a.txt", b"a\n", at="9999-12-31T23:59:59Z")
    lib.record("b.txt", b"b\n", at="0001-01-01T00:00:00Z")
    for args in (["export", "--at", "9999-12-31T23:59:59-14:00", "--out", "x"],
                 ["show", "a.txt", "--at", "0001-01-01T00:00+14:00"],
                 ["show", "a.txt", "--version", str(2**63)]):
        one_line(fails(run_cli(*args, db=db_url, cwd=tmp_path), 2))
    shown = ok(run_cli("--tz", "Pacific/Kiritimati", "log", db=db_url, cwd=tmp_path))
    assert "9999-12-31T23:59:59Z" in shown
    assert ok(run_cli("--tz", "America/Los_Angeles", "history", "b.txt", "--json",
                      db=db_url, cwd=tmp_path))
    command = [sys.executable, "-m", "archive", "--db", db_url]
    closed_out = subprocess.run([*command, "log"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=(), timeout=60,
                                preexec_fn=lambda: os.close(1))
    assert "standard output is closed" in one_line(fails(closed_out, 2))
    closed_in = subprocess.run([*command, "show", "--batch"], cwd=tmp_path,
                               capture_output=True, timeout=60, preexec_fn=lambda: os.close(0))
    assert "standard input" in one_line(fails(closed_in, 2))
    empty = tmp_path / "empty.db"
    empty.touch()
    assert "no archive at" in one_line(fails(run_cli("stats", db=str(empty), cwd=tmp_path), 2))
    assert empty.stat().st_size == 0
    for url in (f"sqlite:///{tmp_path / 'o.db'}?timeout=abc",
                "postgresql+psycopg://user:secret@127.0.0.1:abc/x",
                "postgresql://user:se/cret@localhost:abc/db",
                "postgresql://user@localhost:abc/db?password=secret",
                "postgresql://u:secret@/db?port=abc",
                "postgresql+psycopg2://u:secret@localhost/db",
                "sqlite://c.db"):
        message = one_line(fails(run_cli("stats", db=url, cwd=tmp_path), 2))
        assert "secret" not in message and "cret@" not in message


def test_ingest_deletions_records_only_files_that_are_gone(tmp_path):
    """--deletions records a document deleted only when its file is not there: one recorded
    through a symlinked folder (which a folder walk does not follow) stays alive."""
    docs = tmp_path / "docs"
    write(docs / "a.txt", b"a\n")
    write(tmp_path / "elsewhere" / "s.txt", b"s\n")
    (docs / "sublink").symlink_to(tmp_path / "elsewhere")
    db = str(tmp_path / "d.db")
    ok(run_cli("ingest", "--root", str(docs), str(docs), str(docs / "sublink" / "s.txt"),
               db=db, cwd=tmp_path))
    for name in ("folder", "dangling", "fifo"):
        write(docs / name, b"x\n")
    ok(run_cli("ingest", "--root", str(docs), str(docs), db=db, cwd=tmp_path))
    (docs / "a.txt").unlink()
    for name in ("folder", "dangling", "fifo"):  # no regular file there any more
        (docs / name).unlink()
    (docs / "folder").mkdir()
    (docs / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(docs / "fifo")
    ok(run_cli("ingest", "--root", str(docs), str(docs), "--deletions", db=db, cwd=tmp_path))
    with Archive(db) as arc:
        deleted = sorted(ev.key for ev in arc.log() if ev.type == "deleted")
        assert deleted == ["a.txt", "dangling", "fifo", "folder"]
        assert arc.show("sublink/s.txt").data == b"s\n"
    # The watcher agrees: nothing more to delete, and the guard lets it start.
    ok(run_cli("watch", str(docs), "--once", db=db, cwd=tmp_path))
    with Archive(db) as arc:
        assert sorted(ev.key for ev in arc.log() if ev.type == "deleted") == deleted
