"""Shared fixtures: every storage and CLI test runs on a real SQLite file and on a fresh
PostgreSQL database of its own (when ARCHIVE_TEST_PG_URL names a server)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "seeds"
SHARED_DATA = ROOT.parent / "shared" / "data"
PG_ENV = "ARCHIVE_TEST_PG_URL"


def _pg_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set: PostgreSQL tests skipped (.ci/run sets it)")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test, dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text

    admin = _pg_admin_url()
    name = "archive_test_" + uuid.uuid4().hex[:12]
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """The archive URL under test: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'archive.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def arc(db_url):
    from archive import Archive

    archive = Archive(db_url)
    yield archive
    archive.close()


def run_cli(
    *args: str,
    db: str | None = None,
    cwd: str | os.PathLike | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run the real `archive` command (as `python -m archive`) and capture its output."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("ARCHIVE_DB", None)
    full_env.pop("ARCHIVE_DEBUG", None)
    command = [sys.executable, "-m", "archive"]
    if db is not None:
        command += ["--db", db]
    return subprocess.run(
        command + list(args),
        cwd=cwd,
        input=input,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )


def raw_sql(db_url: str, *statements: str, bypass: tuple[str, ...] = ()) -> None:
    """Run statements on the database behind the archive's back, with the immutability
    triggers of the `bypass` tables switched off for the duration (to simulate damage)."""
    if make_url(db_url).get_backend_name() == "sqlite":
        conn = sqlite3.connect(make_url(db_url).database, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            saved = []
            for table in bypass:
                saved += conn.execute(
                    "SELECT name, sql FROM sqlite_master WHERE type='trigger' AND tbl_name=?",
                    (table,),
                ).fetchall()
            for name, _ in saved:
                conn.execute(f'DROP TRIGGER "{name}"')
            for statement in statements:
                conn.execute(statement)
            for _, sql in saved:
                conn.execute(sql)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            for table in bypass:
                conn.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            for statement in statements:
                conn.exec_driver_sql(statement)
            for table in bypass:
                conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    finally:
        engine.dispose()


def copy_stored_blob(db_url: str, *, into: int, source: int) -> None:
    """Damage: content `into` now holds the stored blob (data and codec) of `source`."""
    raw_sql(
        db_url,
        f"UPDATE contents SET data = (SELECT data FROM contents WHERE id = {source}),"
        f" codec = (SELECT codec FROM contents WHERE id = {source}) WHERE id = {into}",
        bypass=("contents",),
    )
