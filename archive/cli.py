"""The command line: parses options, calls `archive.api.Archive`, prints. Nothing else.

Exit codes: 0 success (also when the reader of standard output closed it early); 1 `verify`
found damage; 2 usage error, bad input, no archive there, or an output that cannot be written;
3 not found.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from . import timeparse
from .errors import ArchiveError, BadInput, NoArchive

EXIT_DAMAGED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERNAL = 1, 2, 3, 70


class TimeType(click.ParamType):
    """A time option, parsed by the archive's one time parser (microseconds, UTC)."""

    name = "TIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return timeparse.parse(value)
        except BadInput as error:
            self.fail(str(error), param, ctx)


TIME = TimeType()


class Context:
    def __init__(self, db: str | None, tz: str | None):
        self.db = db
        self.tz = timeparse.parse_tz(tz)
        self._archive = None

    @property
    def archive(self):
        """The archive, created where there is none yet (for the commands that write)."""
        if self._archive is None:
            from .api import Archive

            self._archive = Archive(self.db)
        return self._archive

    @property
    def existing(self):
        """The archive, for the commands that only read: they never create one (a mistyped
        --db is an error, not a new empty archive)."""
        arc = self.archive
        if not arc.exists():
            raise NoArchive(f"no archive at {arc.shown_url} (`archive init` creates one)")
        return arc

    def when(self, us: int | None) -> str | None:
        return timeparse.show(us, self.tz) if us is not None else None


def _json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


class _PipeClosed(Exception):
    """Standard output's reader went away (`archive show --batch … | head`)."""


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # click turns a broken pipe into exit 1, the code of damage found: caught first.
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _PipeClosed from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    metavar="URL|PATH",
    envvar="ARCHIVE_DB",
    help="SQLAlchemy URL or SQLite file (default: archive.db; env ARCHIVE_DB).",
)
@click.option("--tz", metavar="ZONE", help="Show times in this zone (IANA name or 'local').")
@click.version_option(package_name="archive")
@click.pass_context
def cli(ctx: click.Context, db: str | None, tz: str | None) -> None:
    """An event-sourced archive: every version of every document, replayable at any time."""
    ctx.obj = Context(db, tz)
    ctx.call_on_close(lambda: ctx.obj._archive and ctx.obj._archive.close())


@cli.command()
@click.pass_obj
def init(obj: Context) -> None:
    """Create the archive, or upgrade an older one."""
    revision = obj.archive.init()
    click.echo(f"archive ready at {obj.archive.shown_url} (schema {revision})")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--root", type=click.Path(), help="Keys are paths relative to this folder.")
@click.option("--at", "at", type=TIME, help="Effective time of these versions (default: now).")
@click.option("--deletions", is_flag=True, help="Also record archived files that are gone.")
@click.pass_obj
def ingest(obj: Context, paths, root, at, deletions) -> None:
    """Record the current content of files (folders recursively)."""
    for result in obj.archive.ingest(paths, root=root, at=at, deletions=deletions):
        if result.status != "absent":
            click.echo(f"{result.status:<9} {result.key}")


def _change_text(row: dict[str, Any]) -> str:
    change = row["change"]
    kind = change["kind"]
    if kind == "renamed":
        text = f"renamed from {change.get('from')}"
    elif kind == "deleted":
        text = "deleted"
    elif kind == "binary":
        text = f"binary, {change['added']} bytes"
    else:
        label = {"initial": "first version", "appended": "appended at end", "edited": "edited"}
        text = f"+{change['added']} -{change['removed']} {label.get(kind, kind)}"
    if row["reverts_to"] is not None:
        text += f", revert to v{row['reverts_to']}"
    return text


def _event_json(obj: Context, ev) -> dict[str, Any]:
    return {
        "position": ev.position,
        "key": ev.key,
        "seq": ev.seq,
        "type": ev.type,
        "effective_at": obj.when(ev.effective_at),
        "recorded_at": obj.when(ev.recorded_at),
        "sha256": ev.sha256.hex() if ev.sha256 else None,
        "size": ev.size,
        "event_hash": ev.event_hash.hex(),
        "meta": ev.meta,
    }


def _table(*columns: str):
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=column not in ("change", "key"))
    return table


def _print(renderable) -> None:
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False).print(renderable)


@cli.command()
@click.argument("doc")
@click.option("--json", "as_json", is_flag=True, help="One JSON list on standard output.")
@click.option("--known-at", type=TIME, help="Only what the archive had recorded by then.")
@click.pass_obj
def history(obj: Context, doc: str, as_json: bool, known_at) -> None:
    """Every version of DOC, oldest first, with what changed."""
    rows = obj.existing.changes(doc, known_at=known_at)
    if as_json:
        _json(
            [
                {**_event_json(obj, r["event"]), "change": r["change"],
                 "reverts_to": r["reverts_to"]}
                for r in rows
            ]
        )
        return
    table = _table("v", "type", "effective", "recorded", "sha256", "size", "key", "change")
    for r in rows:
        ev = r["event"]
        table.add_row(
            str(ev.seq),
            ev.type,
            obj.when(ev.effective_at),
            obj.when(ev.recorded_at),
            ev.sha256.hex()[:12] if ev.sha256 else "-",
            str(ev.size),
            ev.key,
            _change_text(r),
        )
    _print(table)


@cli.command()
@click.argument("doc", required=False)
@click.option("--at", "at", type=TIME, help="The version in effect at this time.")
@click.option("--version", "-v", "version", type=click.IntRange(min=1, max=2**63 - 1),
              help="Version number.")
@click.option("--known-at", type=TIME, help="Only what the archive had recorded by then.")
@click.option("--batch", is_flag=True, help="Read DOC<TAB>TIME lines on standard input.")
@click.pass_obj
def show(obj: Context, doc, at, version, known_at, batch: bool) -> None:
    """The exact bytes of DOC (its latest version, at a time, or version N) on standard
    output."""
    if batch:
        if doc or at is not None or version is not None:
            raise click.UsageError("--batch takes its documents and times on standard input")
        if sys.stdin is None:
            raise click.UsageError("--batch reads standard input, which is closed")
        from .batch import serve

        serve(obj.existing, sys.stdin.buffer, sys.stdout.buffer, known_at=known_at)
        return
    if doc is None:
        raise click.UsageError("missing argument 'DOC'")
    if at is not None and version is not None:
        raise click.UsageError("give --at or --version, not both")
    snap = obj.existing.show(doc, at=at, version=version, known_at=known_at)
    out = sys.stdout.buffer
    out.write(snap.data)
    out.flush()


@cli.command()
@click.argument("doc")
@click.argument("from_", metavar="[FROM]", required=False)
@click.argument("to", metavar="[TO]", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["words", "unified", "json"]),
    default="words",
    show_default=True,
)
@click.option("--color/--no-color", default=None, help="Colour (default: on a terminal).")
@click.pass_obj
def diff(obj: Context, doc: str, from_, to, fmt: str, color) -> None:
    """The change in DOC between two versions (numbers or times; default: the last two)."""
    result = obj.existing.diff(doc, from_, to, fmt=fmt)
    if fmt == "json":
        result["from"] = _event_json(obj, result["from"])
        result["to"] = _event_json(obj, result["to"])
        _json(result)
        return
    if fmt == "unified":
        click.echo(result["text"], nl=False)
        return
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    from .changes import render_words

    a, b = result["from"], result["to"]
    click.echo(
        f"{doc}: v{a.seq} ({obj.when(a.effective_at)}) -> v{b.seq} ({obj.when(b.effective_at)})",
        err=False,
    )
    click.echo(render_words(result["diffs"], color=color), nl=False, color=color)
    click.echo()


@cli.command()
@click.option("--since", type=TIME, help="Events effective at or after this time.")
@click.option("--until", type=TIME, help="Events effective at or before this time.")
@click.option("--recorded", is_flag=True, help="Filter by recorded time instead.")
@click.option("--known-at", type=TIME, help="Only what the archive had recorded by then.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list on standard output.")
@click.pass_obj
def log(obj: Context, since, until, recorded: bool, known_at, as_json: bool) -> None:
    """The global event stream, in global order."""
    found = obj.existing.log(
        since=since, until=until, known_at=known_at, by="recorded" if recorded else "effective"
    )
    if as_json:
        _json([_event_json(obj, ev) for ev in found])
        return
    table = _table("pos", "effective", "recorded", "type", "v", "sha256", "size", "key")
    for ev in found:
        table.add_row(
            str(ev.position),
            obj.when(ev.effective_at),
            obj.when(ev.recorded_at),
            ev.type,
            str(ev.seq),
            ev.sha256.hex()[:12] if ev.sha256 else "-",
            str(ev.size),
            ev.key,
        )
    _print(table)


@cli.command()
@click.option("--at", "at", type=TIME, required=True, help="The moment to export.")
@click.option("--known-at", type=TIME, help="Only what the archive had recorded by then.")
@click.option("--out", type=click.Path(), help="Target folder or tar file.")
@click.option("--format", "fmt", type=click.Choice(["dir", "tar"]), default="dir")
@click.option("--force", is_flag=True, help="Replace a non-empty target.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_obj
def export(obj: Context, at, known_at, out, fmt: str, force: bool, as_json: bool) -> None:
    """Write every document that existed at a time, plus MANIFEST.json."""
    manifest = obj.existing.export(at=at, known_at=known_at, out=out, format=fmt, force=force)
    if as_json:
        _json(manifest)
    else:
        click.echo(
            f"exported {len(manifest['documents'])} documents as of {manifest['at']} "
            f"(position {manifest['position']}) to {manifest['out']}"
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def verify(obj: Context, as_json: bool) -> None:
    """Replay every version, recompute every hash, check every chain."""
    problems = obj.existing.verify()
    stats = obj.archive.stats()
    if as_json:
        _json({"ok": not problems, "problems": problems, "documents": stats["documents"],
               "events": stats["events"], "contents": stats["contents"]})
    elif problems:
        for p in problems:
            where = ", ".join(f"{k} {v}" for k, v in p.items() if k != "problem")
            click.echo(f"DAMAGED {where}: {p['problem']}", err=True)
    else:
        click.echo(
            f"ok: {stats['documents']} documents, {stats['events']} events, "
            f"{stats['contents']} contents replayed and hash-checked"
        )
    if problems:
        sys.exit(EXIT_DAMAGED)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def stats(obj: Context, as_json: bool) -> None:
    """Documents, events, distinct contents, raw against stored bytes."""
    result = obj.existing.stats()
    if as_json:
        _json(result)
        return
    table = _table("measure", "value")
    for name, value in result.items():
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(name.replace("_", " "), shown)
    _print(table)


@cli.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    help="Keys are relative to this (default: the folder when one is watched, else the "
    "current directory).",
)
@click.option("--debounce", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Seconds a file must be quiet before its version is read.")
@click.option("--ignore", multiple=True, metavar="GLOB", help="Also ignore these names.")
@click.option("--rescan", type=click.FloatRange(min=0), default=300, show_default=True,
              help="Seconds between full rescans (0: never).")
@click.option("--effective-time", type=click.Choice(["observed", "mtime"]), default="observed",
              show_default=True, help="A version's effective time: when seen, or its mtime.")
@click.option("--once", is_flag=True, help="Reconcile the archive with the folders and exit.")
@click.option("--polling", is_flag=True, help="Poll instead of native notifications.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.pass_obj
def watch(obj: Context, dirs, root, debounce, ignore, rescan, effective_time, once, polling,
          log_level) -> None:
    """Watch folders and record every new version of every file, until stopped."""
    from .watch import watch as run_watch

    run_watch(
        obj.archive,
        dirs,
        root=root,
        debounce=debounce,
        ignore=ignore,
        rescan=rescan,
        effective_time=effective_time,
        once=once,
        polling=polling,
        log_level=log_level,
    )


@cli.command("import-git")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--ref", default="HEAD", show_default=True, help="The history to walk.")
@click.option("--path", "paths", multiple=True, metavar="GLOB", help="Only matching files.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def import_git(obj: Context, repo, ref, paths, as_json: bool) -> None:
    """Record every version of files in a git history (first parent, oldest first)."""
    from .importgit import import_git as run_import

    summary = run_import(obj.archive, repo, ref=ref, paths=paths, progress=not as_json)
    if as_json:
        _json(summary)
    else:
        click.echo(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in summary.items()))


def main(argv: list[str] | None = None) -> None:
    if sys.stdout is None:  # started with standard output closed (`>&-`): nowhere to answer
        click.echo("archive: standard output is closed", err=True)
        sys.exit(EXIT_USAGE)
    try:
        cli.main(args=argv, prog_name="archive", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        message = " ".join(error.format_message().split())
        command = f"{error.ctx.command_path} " if getattr(error, "ctx", None) else ""
        click.echo(f"archive: {command.removeprefix('archive ')}{message}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("archive: interrupted", err=True)
        sys.exit(130)
    except ArchiveError as error:
        click.echo(f"archive: {error}", err=True)
        sys.exit(error.exit_code)
    except (_PipeClosed, BrokenPipeError):
        _quiet_stdout()
        sys.exit(0)
    except OSError as error:  # an output that cannot be written: a full disk, a closed device
        _quiet_stdout()
        where = f"{error.filename}: " if error.filename else "cannot write output: "
        click.echo(f"archive: {where}{error.strerror or error}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("archive: interrupted", err=True)
        sys.exit(130)
    except Exception as error:  # a bug: one line, not a traceback, unless asked for
        if os.environ.get("ARCHIVE_DEBUG"):
            raise
        click.echo(
            f"archive: internal error: {type(error).__name__}: {error} "
            "(set ARCHIVE_DEBUG=1 for a traceback)",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
    try:  # what click.echo left buffered: written now, while a closed pipe can still be told
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    sys.exit(0)


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that flushing it at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor to point: nothing is flushed there
        pass
