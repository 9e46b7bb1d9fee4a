"""`import-git`: a first-parent git history becomes events that answer "what did the file say
at T" exactly as the history does, on real git repositories built here and on a slice of the
real genai-eu-versions bundle (Open Terms Archive, ODC-By 1.0, see ../shared/data/README.md).

The expected answers are computed independently of the importer, from `git ls-tree` of every
first-parent commit: a path "changed" in a commit when its blob differs from the parent's, and
the answer at T is the changing commit with the greatest commit time ≤ T (the later commit wins
a tie), absent where that commit deleted the path or none exists. Commit times that go
backwards (back-filled versions) are what makes this differ from `git rev-list --before`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import SHARED_DATA, run_cli

from archive import BadInput, NotFound
from archive.importgit import import_git

if shutil.which("git") is None:  # the README promises only Python and pip
    pytest.skip("git is not installed: import-git tests need it", allow_module_level=True)

BUNDLE = SHARED_DATA / "genai-eu-versions.bundle"
B = 1_700_000_000  # a base commit time (seconds) for the synthetic repositories
US = 1_000_000


# -- git helpers ----------------------------------------------------------------------------


def _env(tmp: Path, when: int | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "HOME": str(tmp),  # no user configuration
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    if when is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"@{when} +0000"
    return env


def git(repo: Path, *args: str, when: int | None = None, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        env=_env(repo.parent, when),
        input=input,
    ).stdout


def commit(repo: Path, when: int, files: dict[str, bytes | None], message: str = "c") -> str:
    """Write (or delete, for None) files, then commit everything at `when` (epoch seconds)."""
    for name, data in files.items():
        path = repo / name
        if data is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message, when=when)
    return git(repo, "rev-parse", "HEAD").decode().strip()


def new_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    return path


def iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Expected:
    """The answer the rule gives, from `git ls-tree` of each first-parent commit."""

    def __init__(self, repo: Path, ref: str = "HEAD", globs: tuple[str, ...] = ()):
        from fnmatch import fnmatchcase

        self.repo = repo
        lines = git(repo, "rev-list", "--first-parent", "--reverse", "--format=%ct", ref)
        words = lines.decode().split()  # "commit <sha> <ct>" per commit
        self.commits = [(words[i + 1], int(words[i + 2])) for i in range(0, len(words), 3)]
        self.changes: dict[str, list[tuple[int, int, str, str | None]]] = {}
        before: dict[str, str] = {}
        for index, (sha, ct) in enumerate(self.commits):
            tree = {}
            for entry in git(repo, "ls-tree", "-r", "-z", sha).split(b"\0"):
                if entry:
                    meta, path = entry.split(b"\t", 1)
                    if meta.split()[1] == b"blob":
                        tree[path.decode()] = meta.split()[2].decode()
            for path in set(before) | set(tree):
                if before.get(path) != tree.get(path) and (
                    not globs or any(fnmatchcase(path, g) for g in globs)
                ):
                    self.changes.setdefault(path, []).append((ct, index, sha, tree.get(path)))
            before = tree

    def blob_at(self, path: str, t_us: int) -> str | None:
        """Blob id of `path` at `t_us` under the rule, or None where it did not exist."""
        found = [c for c in self.changes.get(path, []) if c[0] * US <= t_us]
        return max(found)[3] if found else None

    def times(self) -> list[int]:
        """Every commit time, one second either side, and the extremes (microseconds)."""
        seconds = {ct + d for _sha, ct in self.commits for d in (-1, 0, 1)}
        return [*sorted(s * US for s in seconds), min(seconds) * US - 1, max(seconds) * US + 1]

    def check(self, arc, pairs: list[tuple[str, int]]) -> int:
        """arc.show agrees with the rule for every (path, time); returns how many existed."""
        present = 0
        for path, t in pairs:
            want = self.blob_at(path, t)
            if want is None:
                with pytest.raises(NotFound):
                    arc.show(path, at=t)
            else:
                got = arc.show(path, at=t).data
                assert blob_id(got) == want, (path, t)
                present += 1
        return present


# -- a synthetic repository with every kind of change ------------------------------------------


BINARY = bytes(range(256)) * 3 + b"\x00\xff\xfe"
GLOBS = ("docs/*", "img/*.bin")


def build(repo: Path) -> dict[str, str]:
    """A history with a back-filled commit, a tie, a deletion, a rename, a revert, binary
    content, a path no glob matches, and a merge (only its first-parent diff counts)."""
    c = {}
    c1_a = "Première version — 🌍\r\n".encode()
    c["c1"] = commit(repo, B + 100, {
        "docs/a.txt": c1_a,
        "docs/b.md": b"# B\n\nfirst\n",
        "docs/c.txt": b"C one\n",
        "docs/order.txt": b"X\n",
        "img/logo.bin": BINARY,
        "notes/skip.log": b"not matched\n",
    })
    c["c2"] = commit(repo, B + 200, {"docs/a.txt": b"A two\n", "docs/c.txt": None})
    # Dated before its parent: a back-filled version, honoured by time.
    c["c3"] = commit(repo, B + 150, {
        "docs/a.txt": b"A three\n", "docs/b.md": b"# B\n\ntwo\n", "docs/order.txt": b"Y\n",
    })
    # Dated between c1 and c3, with c1's bytes: the version in effect then, still a version.
    c["c4"] = commit(repo, B + 120, {
        "docs/a.txt": c1_a, "notes/skip.log": b"x\n", "docs/order.txt": b"X\n",
    })
    # Dated before c4 and recorded after it in commit order: time order still has c4's X
    # in effect from 120 on.
    c["c4b"] = commit(repo, B + 110, {"docs/order.txt": b"Z\n"})
    git(repo, "mv", "docs/b.md", "docs/renamed.md")
    c["c5"] = commit(repo, B + 300, {})  # a pure rename
    # Same commit time as c5: the later commit wins the tie.
    c["c6"] = commit(repo, B + 300, {"docs/renamed.md": b"# B\n\nthree\n", "docs/a.txt": b"A4\n"})
    git(repo, "checkout", "-q", "-b", "side", c["c2"])
    commit(repo, B + 310, {"docs/side.txt": b"only on the side branch\n"})
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "-m", "merge", "side", when=B + 320)
    c["merge"] = git(repo, "rev-parse", "HEAD").decode().strip()
    c["c7"] = commit(repo, B + 400, {
        "docs/c.txt": b"C again\n",  # re-created after its deletion
        "img/logo.bin": BINARY[::-1],
        "docs/a.txt": c1_a,  # a revert to c1's bytes
    })
    return c


def test_import_matches_history(arc, tmp_path):
    repo = new_repo(tmp_path / "repo")
    c = build(repo)
    summary = import_git(arc, repo, paths=GLOBS, progress=False)
    # c1: 5 created; c2: a modified, c deleted; c3: 3; c4: a (c1's bytes again), order;
    # c4b: order; c5: b deleted, renamed created; c6: 2; merge: side created; c7: 3.
    assert summary["versions"] == 5 + 2 + 3 + 2 + 1 + 2 + 2 + 1 + 3
    assert summary["deletions"] == 2
    assert summary["unchanged"] == 0
    assert summary["commits"] == 9

    expected = Expected(repo, globs=GLOBS)
    keys = sorted(expected.changes)
    assert keys == [
        "docs/a.txt", "docs/b.md", "docs/c.txt", "docs/order.txt", "docs/renamed.md",
        "docs/side.txt",
        "img/logo.bin",
    ]
    assert expected.check(arc, [(k, t) for k in keys for t in expected.times()]) > 0
    with pytest.raises(NotFound):
        arc.show("notes/skip.log")

    # Exact bytes, as git shows them, at a few chosen moments.
    def shown(rev: str, path: str) -> bytes:
        return git(repo, "show", f"{rev}:{path}")

    assert arc.show("docs/a.txt", at=(B + 175) * US).data == shown(c["c3"], "docs/a.txt")
    assert arc.show("docs/a.txt", at=(B + 250) * US).data == shown(c["c2"], "docs/a.txt")
    assert arc.show("docs/a.txt", at=(B + 300) * US).data == shown(c["c6"], "docs/a.txt")
    assert arc.show("docs/a.txt").data == shown(c["c7"], "docs/a.txt")
    assert arc.show("img/logo.bin", at=(B + 399) * US).data == BINARY
    assert arc.show("img/logo.bin").data == BINARY[::-1]
    assert arc.show("docs/side.txt", at=(B + 320) * US).data == shown(c["merge"], "docs/side.txt")
    with pytest.raises(NotFound):
        arc.show("docs/side.txt", at=(B + 319) * US)  # the side commit itself is not walked
    with pytest.raises(NotFound):
        arc.show("docs/c.txt", at=(B + 300) * US)  # deleted by c2
    with pytest.raises(NotFound):
        arc.show("docs/b.md", at=(B + 300) * US)  # renamed away by c5
    assert arc.show("docs/renamed.md", at=(B + 300) * US).data == b"# B\n\nthree\n"
    assert arc.show("docs/order.txt", at=(B + 115) * US).data == b"Z\n"
    assert arc.show("docs/order.txt", at=(B + 120) * US).data == b"X\n"
    assert arc.show("docs/order.txt", at=(B + 150) * US).data == b"Y\n"

    # Every event carries its commit and the commit time.
    times = {sha: ct for sha, ct in expected.commits}
    events = arc.log()
    assert len(events) == summary["versions"]
    for ev in events:
        assert ev.effective_at == times[ev.meta["commit"]] * US

    # Importing again records nothing.
    again = import_git(arc, repo, paths=GLOBS, progress=False)
    assert again["versions"] == 0 and again["commits"] == 0
    assert len(arc.log()) == len(events)


def test_incremental_import(arc, tmp_path):
    repo = new_repo(tmp_path / "repo")
    build(repo)
    first = import_git(arc, repo, paths=GLOBS, progress=False)
    high = max(ev.position for ev in arc.log())
    new = {
        commit(repo, B + 500, {"docs/a.txt": b"A five\n"}),
        # Back-filled before the versions of the first import.
        commit(repo, B + 180, {"docs/a.txt": b"A back-filled\n", "docs/new.txt": b"new\n"}),
        commit(repo, B + 700, {"docs/a.txt": b"A six\n"}),
        # The bytes in effect at its time (from the commit dated 180): a version all the same.
        commit(repo, B + 190, {"docs/a.txt": b"A back-filled\n"}),
        commit(repo, B + 600, {"docs/c.txt": None}),
    }
    second = import_git(arc, repo, paths=GLOBS, progress=False)
    assert second["versions"] == 6 and second["deletions"] == 1 and second["commits"] == 5
    assert second["unchanged"] == 0
    added = [ev for ev in arc.log() if ev.position > high]
    assert len(added) == 6 and {ev.meta["commit"] for ev in added} == new
    expected = Expected(repo, globs=GLOBS)
    pairs = [(k, t) for k in expected.changes for t in expected.times()]
    expected.check(arc, pairs)
    assert import_git(arc, repo, paths=GLOBS, progress=False)["versions"] == 0
    assert first["versions"] == 21


def test_a_back_dated_revert_is_a_version_and_a_mode_change_is_not(arc, tmp_path):
    """A commit dated before its parent that sets the bytes already in effect at its time is
    still a version of the file, with its commit id; a change of mode alone is none. Neither
    is offered again on the next import."""
    repo = new_repo(tmp_path / "repo")
    c1 = commit(repo, B + 100, {"f.txt": b"X\n"})
    c2 = commit(repo, B + 300, {"f.txt": b"Y\n"})
    c3 = commit(repo, B + 200, {"f.txt": b"X\n"})  # a back-dated revert to c1's bytes
    git(repo, "update-index", "--chmod=+x", "f.txt")
    git(repo, "commit", "-q", "-m", "chmod", when=B + 400)
    summary = import_git(arc, repo, progress=False)
    assert (summary["versions"], summary["unchanged"], summary["commits"]) == (3, 0, 3)
    history = arc.history("f.txt")
    assert [ev.meta["commit"] for ev in history] == [c1, c3, c2]  # by commit time
    assert history[1].sha256 == history[0].sha256 and history[1].effective_at == (B + 200) * US
    assert arc.show("f.txt", at=(B + 250) * US).data == b"X\n"
    assert arc.show("f.txt", at=(B + 350) * US).data == b"Y\n"
    again = import_git(arc, repo, progress=False)
    assert (again["versions"], again["unchanged"]) == (0, 0)


def test_all_paths_and_ref(arc, tmp_path):
    repo = new_repo(tmp_path / "repo")
    c = build(repo)
    summary = import_git(arc, repo, ref=c["c3"], progress=False)  # no globs: every file
    assert summary["versions"] == 6 + 2 + 3  # notes/skip.log included
    assert arc.show("notes/skip.log").data == b"not matched\n"
    assert arc.show("docs/a.txt").data == b"A two\n"  # c2 (200) is later than c3 (150)


def test_bad_input(arc, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(BadInput):
        import_git(arc, plain, progress=False)
    repo = new_repo(tmp_path / "repo")
    commit(repo, B, {"a.txt": b"a"})
    with pytest.raises(BadInput):
        import_git(arc, repo, ref="no-such-branch", progress=False)
    (repo / os.fsdecode(b"bad\xffname.txt")).write_bytes(b"b")  # not UTF-8: no key
    commit(repo, B + 1, {})
    with pytest.raises(BadInput, match="exclude it with --path"):
        import_git(arc, repo, progress=False)
    assert arc.log() == []  # refused before anything was recorded
    assert import_git(arc, repo, paths=["a.*"], progress=False)["versions"] == 1


def test_cli(db_url, tmp_path):
    repo = new_repo(tmp_path / "repo")
    build(repo)
    done = run_cli("import-git", str(repo), "--path", "docs/*", "--json", db=db_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["versions"] == 21 - 2  # img/logo.bin twice
    shown = run_cli("show", "docs/a.txt", "--at", iso(B + 175), db=db_url)
    assert shown.returncode == 0 and shown.stdout == b"A three\n"
    missing = run_cli("show", "docs/c.txt", "--at", iso(B + 300), db=db_url)
    assert missing.returncode == 3, missing.stderr
    again = run_cli("import-git", str(repo), "--path", "docs/*", db=db_url)
    assert again.returncode == 0 and "versions: 0" in again.stdout.decode()


# -- the real history -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_clone(tmp_path_factory) -> Path:
    if not BUNDLE.exists():
        pytest.skip(f"{BUNDLE} is absent: the real-history test needs the shared data set")
    target = tmp_path_factory.mktemp("real") / "genai-eu-versions"
    subprocess.run(
        ["git", "clone", "-q", str(BUNDLE), str(target)],
        check=True,
        capture_output=True,
        env=_env(target.parent),
    )
    return target


def test_real_history_slice(arc, bundle_clone):
    """The first 150 commits, then (incrementally) up to commit 215, which brings the first
    three commits dated before their parents (206, 208, 210)."""
    walk = git(bundle_clone, "rev-list", "--first-parent", "--reverse", "HEAD").decode().split()
    first = import_git(arc, bundle_clone, ref=walk[149], progress=False)
    assert first["commits"] == 150
    second = import_git(arc, bundle_clone, ref=walk[214], progress=False)
    assert second["commits"] == 65 and second["versions"] >= 65
    assert import_git(arc, bundle_clone, ref=walk[214], progress=False)["versions"] == 0

    expected = Expected(bundle_clone, ref=walk[214])
    times = {ct for _sha, ct in expected.commits}
    backwards = [
        ct for (_a, prev), (_b, ct) in zip(expected.commits, expected.commits[1:], strict=False)
        if ct < prev
    ]
    assert len(backwards) == 3
    rng = random.Random(4)
    keys = sorted(expected.changes)
    grid = expected.times()
    pairs = [(rng.choice(keys), rng.choice(grid)) for _ in range(250)]
    # Around each back-filled commit, every path it touched and every path at all.
    for ct in backwards:
        for t in (ct - 1, ct, ct + 1, ct + 60):
            pairs += [(k, t * US) for k in keys if any(c[0] == ct for c in expected.changes[k])]
        pairs += [(k, ct * US) for k in rng.sample(keys, 10)]
    assert len(times) > 200
    assert expected.check(arc, pairs) > 100
