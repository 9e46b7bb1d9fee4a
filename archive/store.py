"""The storage layer: tables, engines, transactions, schema upgrades and driver errors.

This is the one module that knows which engine is underneath. Everything that differs between
SQLite and PostgreSQL (URLs, pragmas, how a writer takes the lock, how a missing table is
detected, which driver error means what) lives here; callers see connections inside
transactions and the archive's own errors.

Writers are serialised: on SQLite by `BEGIN IMMEDIATE` (a plain deferred BEGIN fails at once
with "database is locked" instead of waiting), on PostgreSQL by `LOCK TABLE events IN EXCLUSIVE
MODE` (readers are not blocked, and positions become visible in commit order). Under that lock
sequence numbers and positions are allocated gaplessly; `UNIQUE(doc_id, seq)` stays as the
optimistic-concurrency guard, and a lost race is retried as a whole unit.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exc,
)
from sqlalchemy.engine import make_url

from .errors import ArchiveError, BadInput, Conflict, Locked, StorageError

T = TypeVar("T")

# Alembic revisions in order; the last is the schema this code reads and writes. A test checks
# this against the scripts in alembic/versions, so start-up never has to import Alembic.
REVISIONS = ("0001", "0002")
HEAD = REVISIONS[-1]

# WAL pages between automatic checkpoints (SQLite's default: 1,000; see `_sqlite_engine`).
SQLITE_CHECKPOINT_PAGES = 10_000

# A SQLite INTEGER PRIMARY KEY is the rowid; BIGINT would not be.
_Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

documents = Table(
    "documents",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=False),
    # The current name; NULL once another document has taken it over.
    Column("key", Text, unique=True),
    Column("seq", Integer, nullable=False),  # last sequence number
    Column("head_hash", LargeBinary(32), nullable=False),  # event_hash of event `seq`
    # The version in effect at the latest effective time: lets the common (not back-filled)
    # ingest decide "unchanged" without reading events.
    Column("eff_at", BigInteger, nullable=False),
    Column("content_id", _Id, ForeignKey("contents.id")),  # NULL when deleted
)

doc_names = Table(
    "doc_names",
    metadata,
    Column("key", Text, nullable=False),
    Column("doc_id", _Id, ForeignKey("documents.id"), nullable=False),
    PrimaryKeyConstraint("key", "doc_id"),
)

contents = Table(
    "contents",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=False),
    Column("sha256", LargeBinary(32), nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    Column("base_id", _Id, ForeignKey("contents.id")),  # NULL: a keyframe
    Column("depth", SmallInteger, nullable=False),  # deltas between this and its keyframe
    Column("codec", SmallInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("position", _Id, primary_key=True, autoincrement=False),
    Column("doc_id", _Id, ForeignKey("documents.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("type", SmallInteger, nullable=False),
    Column("key", Text, nullable=False),
    Column("content_id", _Id, ForeignKey("contents.id")),
    Column("size", BigInteger, nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
    Column("effective_at", BigInteger, nullable=False),
    Column("meta", Text),
    Column("event_hash", LargeBinary(32), nullable=False),
    UniqueConstraint("doc_id", "seq", name="uq_events_doc_seq"),
    Index("ix_events_doc_time", "doc_id", "effective_at", "seq"),
)


def resolve_url(target: str | None) -> str:
    """`--db` / `ARCHIVE_DB` as a SQLAlchemy URL: a URL is kept, a path becomes SQLite."""
    target = target or os.environ.get("ARCHIVE_DB") or "archive.db"
    if "://" not in target:
        return "sqlite:///" + str(Path(target).expanduser().absolute())
    if target.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + target.split("://", 1)[1]
    return target


def sqlite_files(url: str) -> list[Path]:
    """The files a SQLite archive lives in (never to be ingested as documents)."""
    parsed = make_url(url)
    path = _sqlite_path(parsed) if parsed.get_backend_name() == "sqlite" else None
    if path is None:
        return []
    # SQLite names its -wal and -shm after the file it opened, the symlink's target when
    # the path is a symlink: both spellings are the archive's.
    found: dict[Path, None] = {}
    for main in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        found[main] = None
        found.update((main.with_name(main.name + s), None) for s in ("-wal", "-shm", "-journal"))
    return list(found)


def _masked(url: str) -> str:
    """A URL for messages: a password, in the user part or as a query option, masked."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


def _sqlite_path(parsed) -> str | None:
    """The file of a SQLite URL (None: in memory). With `uri=true` the database part is a
    SQLite URI, `file:PATH?mode=ro…` (SQLAlchemy's form for read-only and other options)."""
    database = parsed.database
    if not database or database == ":memory:":
        return None
    if parsed.query.get("uri") == "true":
        if not database.startswith("file:"):
            raise BadInput(
                "with uri=true the path must start with file: "
                "(as in sqlite:///file:/path/archive.db?mode=ro&uri=true)"
            )
        path = database.removeprefix("file:")
        path = path[2:] if path.startswith("//") else path  # file:///abs/path
        return None if path == ":memory:" or parsed.query.get("mode") == "memory" else path
    return database


class Store:
    """An engine plus the one place transactions begin, commit and roll back."""

    def __init__(self, url: str | None = None, *, busy_timeout: float = 60.0):
        self.url = resolve_url(url)
        try:
            parsed = make_url(self.url)
        except (exc.ArgumentError, ValueError) as error:  # ValueError: a port that is no number
            raise BadInput(f"not a database URL or path: {_masked(str(url))!r} ({error})") from None
        self.dialect = parsed.get_backend_name()
        # For messages: a password masked (rendering also escapes a path, so only then).
        self.shown_url = _masked(
            parsed.render_as_string(hide_password=True) if parsed.password else self.url
        )
        if self.dialect not in ("sqlite", "postgresql"):
            raise BadInput(f"unsupported database {self.dialect!r}: use SQLite or PostgreSQL")
        self.busy_timeout = busy_timeout
        try:
            if self.dialect == "sqlite":
                self.engine = self._sqlite_engine(parsed)
            else:
                self.engine = create_engine(self.url, pool_pre_ping=True)
        except (TypeError, ValueError, exc.ArgumentError) as error:  # options it cannot use
            raise BadInput(f"{self.shown_url}: {_first_line(error)}") from None
        except ImportError as error:  # postgresql+psycopg2:// and the like
            raise BadInput(
                f"{self.shown_url}: driver {error.name or error} is not installed "
                "(use postgresql+psycopg:// or a plain postgresql:// URL)"
            ) from None
        self._schema_checked = False
        # Per-thread DB-API connections kept open for `snapshot` (hot reads).
        self._local = threading.local()
        self._held: list[Any] = []
        self._held_lock = threading.Lock()

    # -- engines -------------------------------------------------------------------------

    def _sqlite_engine(self, parsed) -> Engine:
        path = _sqlite_path(parsed)
        if path is not None:
            folder = Path(path).absolute().parent
            if not folder.is_dir():
                raise BadInput(f"no archive at {self.shown_url}: folder {folder} does not exist")
        with warnings.catch_warnings():
            # SQLAlchemy warns of URL options pysqlite ignores (`?mode=ro` without uri=true):
            # an archive opened otherwise than asked is an error, said in one line.
            warnings.simplefilter("error", exc.SAWarning)
            try:
                engine = create_engine(self.url)
            except exc.SAWarning as warning:
                said = str(warning).split(" (Background")[0]
                raise BadInput(f"{self.shown_url}: {said}") from None
        busy_ms = int(self.busy_timeout * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:
            # Let SQLAlchemy's begin event, not pysqlite, decide when a transaction starts.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # synchronous and busy_timeout reset on every connection; journal_mode is kept in
            # the file. FULL: a committed version survives power loss too.
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            # A batch spread over many documents dirties index pages all over the events'
            # (doc, time) and (doc, seq) indexes and the contents' SHA-256 index, and each
            # commit appends them all to the WAL again. Checkpointing every 10,000 pages
            # instead of SQLite's 1,000 copies each such page into the database once per ten
            # batches, not once per batch: on 1,000 documents x 100 versions that wrote 5.5
            # KB per version instead of 8.3 and the ingest was about 8 % faster. The WAL
            # grows to 40 MB while a writer runs and is removed when the last connection
            # closes (a larger page cache read less but was not faster, and costs memory),
            cur.execute(f"PRAGMA wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}")
            # and a WAL grown past that (a reader held a checkpoint back) is cut back to it
            # at the next checkpoint that empties it, instead of keeping its largest size.
            cur.execute(f"PRAGMA journal_size_limit={SQLITE_CHECKPOINT_PAGES * 4096}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("archive_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def dispose(self) -> None:
        with self._held_lock:
            held, self._held = self._held, []
        for raw in held:
            with suppress(Exception):  # a broken connection is being thrown away anyway
                raw.close()  # back to the pool, which dispose then closes
        self._local = threading.local()
        self.engine.dispose()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them (closing
        an inherited SQLite handle would release the parent's locks, a PostgreSQL one would
        end its session); the child then opens its own."""
        self._held_lock = threading.Lock()
        self._held = []
        self._local = threading.local()
        self.engine.dispose(close=False)

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except ArchiveError:
            raise
        except exc.IntegrityError as error:
            raise Conflict(f"concurrent write conflict: {_first_line(error)}") from error
        except exc.OperationalError as error:
            text = str(error.orig).lower()
            if "locked" in text or "busy" in text:
                raise Locked(
                    f"database is locked by another writer: {_first_line(error)}"
                ) from error
            if getattr(error.orig, "sqlstate", None) in ("40001", "40P01"):
                raise Conflict(f"concurrent write conflict: {_first_line(error)}") from error
            raise StorageError(f"database error: {_first_line(error)}") from error
        except exc.DBAPIError as error:
            raise StorageError(f"database error: {_first_line(error)}") from error

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot for everything the caller reads."""
        self.ensure_schema()
        with (
            self._translated(),
            self._translated_driver(),
            self.engine.connect() as conn,
            conn.begin(),
        ):
            if self.dialect == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction holding the writers' lock; commits on success."""
        self.ensure_schema()
        # Hot paths write through the driver's cursor (`cursor`): its errors are translated too.
        with self._translated(), self._translated_driver(), self.engine.connect() as conn:
            conn = conn.execution_options(archive_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.exec_driver_sql("LOCK TABLE events IN EXCLUSIVE MODE")
                yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Cursor]:
        """A driver-level cursor in a read snapshot, for hot paths (point-in-time reads,
        `show --batch`, export): SQLAlchemy costs about 50 µs per statement, which is more
        than a whole indexed read. The connection stays open per thread between calls."""
        self.ensure_schema()
        raw = getattr(self._local, "raw", None)
        if raw is None:
            with self._translated():
                raw = self.engine.raw_connection()
            if self.dialect == "postgresql":
                from psycopg import IsolationLevel

                raw.driver_connection.isolation_level = IsolationLevel.REPEATABLE_READ
            self._local.raw = raw
            with self._held_lock:
                self._held.append(raw)
        cursor = raw.cursor()
        try:
            with self._translated_driver():
                if self.dialect == "sqlite":
                    cursor.execute("BEGIN")
                yield Cursor(cursor, self.dialect)
        except BaseException:
            self._end(raw, cursor, commit=False)
            raise
        self._end(raw, cursor, commit=True)

    def _end(self, raw: Any, cursor: Any, *, commit: bool) -> None:
        try:
            if self.dialect == "sqlite":
                cursor.execute("COMMIT" if commit else "ROLLBACK")
            else:
                raw.commit() if commit else raw.rollback()
            cursor.close()
        except Exception:  # a connection that cannot end its read is replaced
            self._local.raw = None
            with self._held_lock:
                if raw in self._held:
                    self._held.remove(raw)
            with suppress(Exception):
                raw.invalidate()

    def cursor(self, conn: Connection) -> Cursor:
        """The driver-level cursor under a SQLAlchemy connection, in its transaction."""
        return Cursor(conn.connection.cursor(), self.dialect)

    @contextmanager
    def _translated_driver(self) -> Iterator[None]:
        """Driver errors raised outside SQLAlchemy, as the archive's own."""
        dbapi = self.engine.dialect.dbapi
        try:
            yield
        except ArchiveError:
            raise
        except dbapi.Error as error:
            wrapped = exc.DBAPIError.instance(None, None, error, dbapi.Error)
            with self._translated():
                raise wrapped from error

    def run_write(self, unit: Callable[[Connection], T], *, attempts: int = 8) -> T:
        """Run `unit` in a write transaction, retrying the whole unit after a lost race."""
        for attempt in range(attempts):
            try:
                with self.write() as conn:
                    return unit(conn)
            except (Conflict, Locked):
                if attempt == attempts - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    def database_size(self, conn: Connection) -> int:
        """Bytes the archive occupies: the SQLite file's pages, or PostgreSQL's tables with
        their indexes and TOAST."""
        if self.dialect == "sqlite":
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
            return pages * (conn.exec_driver_sql("PRAGMA page_size").scalar() or 0)
        return conn.exec_driver_sql(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "WHERE c.relname IN ('events', 'contents', 'documents', 'doc_names', "
            "'alembic_version') AND c.relkind = 'r' AND pg_table_is_visible(c.oid)"
        ).scalar()

    # -- schema --------------------------------------------------------------------------

    def _current_revision(self, conn: Connection) -> str | None:
        if self.dialect == "sqlite":
            exists = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'"
            ).scalar()
        else:
            exists = conn.exec_driver_sql("SELECT to_regclass('alembic_version')").scalar()
        if not exists:
            return None
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()

    def revision(self) -> str | None:
        with self._translated(), self.engine.connect() as conn, conn.begin():
            return self._current_revision(conn)

    def exists(self) -> bool:
        """Whether an archive is there, without creating one: for SQLite the file must exist
        before it is opened (opening creates it), then any schema revision must be recorded.
        A current schema counts as checked, so the reads that follow ask nothing again."""
        if self.dialect == "sqlite":
            path = _sqlite_path(make_url(self.url))
            if path is None or not Path(path).is_file() or Path(path).stat().st_size == 0:
                return False  # an empty file is no archive, and opening it would write one
        current = self.revision()
        if current == HEAD:
            self._schema_checked = True
        return current is not None

    def ensure_schema(self) -> None:
        """Create or upgrade the schema if needed; refuse a schema newer than this code.

        The common case (schema current) costs one query and never imports Alembic.
        """
        if self._schema_checked:
            return
        current = self.revision()
        if current != HEAD:
            self._check_known(current)
            self._upgrade()
        self._schema_checked = True

    def _check_known(self, current: str | None) -> None:
        if current is not None and current not in REVISIONS:
            raise StorageError(
                f"this archive has schema revision {current!r}, newer than this version of "
                f"archive understands (latest {HEAD!r}): upgrade the archive package"
            )

    def _upgrade(self) -> None:
        from alembic import command

        from .migrations import alembic_config

        with self._translated(), self.engine.connect() as conn:
            conn = conn.execution_options(archive_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    # Two processes opening a new database at once: one migrates, one waits.
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7318010)")
                current = self._current_revision(conn)  # again, under the lock
                self._check_known(current)
                if current != HEAD:
                    config = alembic_config()
                    config.attributes["connection"] = conn
                    command.upgrade(config, "head")


_PLACEHOLDER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Cursor:
    """A DB-API cursor that takes the archive's `:name` placeholders on either engine, so
    hot-path SQL is written once (PostgreSQL's driver wants `%(name)s`)."""

    __slots__ = ("_pg", "raw")
    _converted: ClassVar[dict[str, str]] = {}

    def __init__(self, raw: Any, dialect: str):
        self.raw = raw
        self._pg = dialect == "postgresql"

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        if self._pg:
            sql = self._convert(sql)
        self.raw.execute(sql, params or {})
        return self.raw

    def executemany(self, sql: str, rows: list[dict[str, Any]]) -> None:
        if self._pg:
            sql = self._convert(sql)
        self.raw.executemany(sql, rows)

    def _convert(self, sql: str) -> str:
        converted = self._converted.get(sql)
        if converted is None:
            converted = _PLACEHOLDER.sub(r"%(\1)s", sql.replace("%", "%%"))
            self._converted[sql] = converted
        return converted

    @staticmethod
    def in_list(name: str, values: list[Any]) -> tuple[str, dict[str, Any]]:
        """`(:name0, :name1, …)` and its parameters, for `IN` over a list."""
        params = {f"{name}{i}": v for i, v in enumerate(values)}
        return "(" + ", ".join(f":{p}" for p in params) + ")", params


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
