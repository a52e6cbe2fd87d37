"""The store beyond one SQLite file: Alembic migrations, PostgreSQL (a real server), fsspec asset storage.

PostgreSQL tests use the session's server from tests/postgres.py; fsspec tests use its local filesystem at a
folder outside the home and its in-memory filesystem.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, select

from atelier.errors import StoreError
from store import NewAsset, lineage, open_store, queries, save
from store.db import current_revision, head_revision
from store.files import FsspecFiles
from store.schema import Asset, Base, Run, RunAsset


def _asset(key: str, data: bytes, parents=()) -> NewAsset:
    return NewAsset(key=key, stage="draft", kind="image", campaign="c", deliverable="d", data=data, suffix=".png",
                    params={"seed": 1}, parents=tuple(parents))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'lineage.db'}"


# ---------------------------------------------------------------------------------------------- migrations
def test_migrated_schema_equals_the_models(db_url, tmp_path) -> None:
    store = open_store(tmp_path / "home", db_url)
    with store.sessions.kw["bind"].connect() as conn:
        assert current_revision(conn) == head_revision()
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []  # autogenerate finds nothing


def test_a_store_made_before_migrations_is_adopted_as_the_baseline(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    # how atelier made stores before it had migrations (the tables of that time, revision 0001's)
    old = ("runs", "assets", "edges", "run_assets", "scores", "stage_runs")
    Base.metadata.create_all(engine, tables=[Base.metadata.tables[t] for t in old])
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO runs (id, campaign, brief_path, brief_sha256, profile, status, started_at, "
                             "info) VALUES ('old', 'c', 'b', 'x', 'tiny', 'completed', '2026-01-01 00:00:00', '{}')")
    engine.dispose()
    store = open_store(tmp_path / "home", url)
    with store.sessions() as s:
        assert s.get(Run, "old").status == "completed"
        assert current_revision(s.connection()) == head_revision()


def test_revisions_read_without_alembic_agree_with_alembic(tmp_path) -> None:
    """``open_store`` compares revisions without importing Alembic (every command pays that import otherwise):
    the head read from the migration files' text and the row read with plain SQL are Alembic's own."""
    from alembic.script import ScriptDirectory

    from store.db import alembic_config

    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
    home = tmp_path / "home"
    home.mkdir()
    with create_engine(f"sqlite:///{home / 'lineage.db'}").connect() as conn:
        assert current_revision(conn) is None  # an empty database: never stamped
    with open_store(home).sessions() as s:
        assert current_revision(s.connection()) == MigrationContext.configure(s.connection()).get_current_revision()
    code = ("import sys; from store import open_store; open_store(sys.argv[1]); "
            "assert 'alembic' not in sys.modules, 'a store at head imported alembic'")
    subprocess.run([sys.executable, "-c", code, str(home)], check=True, cwd=Path(__file__).parent.parent)


def test_migrations_ship_inside_the_package() -> None:
    import store

    versions = Path(store.__file__).parent / "migrations" / "versions"
    assert (versions.parent / "env.py").is_file() and list(versions.glob("0001_*.py"))


# ---------------------------------------------------------------------------------------------- PostgreSQL
WORKER = """
import sys, time
from pathlib import Path
from store import NewAsset, lineage, open_store, save
url, home, go, worker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
go.with_name(f"{go.name}.ready{worker}").touch()
while not go.exists():
    time.sleep(0.001)
store = open_store(home, url)  # a fresh database: all four migrate it at once
lineage.start_run(store, f"run{worker}", "c", "brief.yaml", "0" * 64, "tiny", {})
for i in range(0, 120, 3):  # every worker saves the same keys, three per save, in the same order
    save(store, f"run{worker}", [NewAsset(key=f"k{j:03d}", stage="draft", kind="image", campaign="c",
                                          deliverable="d", data=b"pixels %d" % (j % 40), suffix=".png",
                                          params={"j": j}) for j in range(i, i + 3)])
"""


def test_processes_racing_on_a_fresh_postgres_store_migrate_once_and_store_each_key_once(postgres_url,
                                                                                         tmp_path) -> None:
    home, go, workers = tmp_path / "home", tmp_path / "go", 4
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, str(home), str(go), str(w)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in range(workers)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outputs), [out[-2000:] for rc, out in outputs if rc]
    store = open_store(home, postgres_url)
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Asset)) == 120
        memberships = s.execute(select(RunAsset.asset_key, RunAsset.status)).all()
        paths = set(s.scalars(select(Asset.path)))
    assert Counter(k for k, _ in memberships) == {f"k{i:03d}": workers for i in range(120)}
    assert Counter(k for k, st in memberships if st == "computed") == {f"k{i:03d}": 1 for i in range(120)}
    files = [p for p in (home / "assets").rglob("*") if p.is_file()]
    assert len(paths) == 40 and sorted(str(p.relative_to(home)) for p in files) == sorted(paths)


def test_two_sessions_saving_one_key_at_once_store_it_once(postgres_url, tmp_path) -> None:
    """The ON CONFLICT path itself: the second insert waits for the first transaction, then does nothing."""
    store = open_store(tmp_path / "home", postgres_url)
    lineage.start_run(store, "r1", "c", "b", "0" * 64, "tiny", {})
    lineage.start_run(store, "r2", "c", "b", "0" * 64, "tiny", {})
    first, second = store.sessions(), store.sessions()
    try:
        first.begin()
        assert lineage._insert_new(first, Asset, _row("k1", "r1"))  # not committed yet
        import threading

        result = {}
        t = threading.Thread(target=lambda: result.update(inserted=lineage._insert_new(second, Asset,
                                                                                      _row("k1", "r2"))))
        second.begin()
        t.start()
        t.join(0.5)
        assert t.is_alive()  # blocked on the first transaction's uncommitted row
        first.commit()
        t.join(10)
        assert result == {"inserted": False}
        second.commit()
    finally:
        first.close()
        second.close()
    with store.sessions() as s:
        assert s.get(Asset, "k1").run_id == "r1"


def _row(key: str, run_id: str) -> dict:
    from store.lineage import utcnow

    return dict(key=key, stage="draft", kind="image", campaign="c", deliverable="d", path="assets/x", sha256="0" * 64,
                width=None, height=None, params={}, model=None, seconds=0.0, run_id=run_id, created_at=utcnow())


# ------------------------------------------------------------------------------------------ bad input
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("atelier")), *args], capture_output=True, text=True,
                          timeout=120)


def test_unreachable_store_is_one_line_naming_the_option(tmp_path) -> None:
    res = _cli("runs", "--home", str(tmp_path / "home"), "--store", "postgresql+psycopg://atelier:secret@127.0.0.1:1/x")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: --store: cannot connect to") and "secret" not in res.stderr
    assert not (tmp_path / "home").exists()
    res = _cli("runs", "--home", str(tmp_path / "home"), "--store", "nosuchdb://x")
    assert res.returncode == 2 and "--store" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_unknown_asset_protocol_is_one_line_naming_the_option(tmp_path) -> None:
    brief = Path(__file__).resolve().parent.parent / "campaigns" / "demo.yaml"
    res = _cli("run", str(brief), "--home", str(tmp_path / "home"), "--assets", "nosuchfs://bucket/x")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "--assets" in res.stderr and "nosuchfs" in res.stderr
    assert not (tmp_path / "home").exists()  # nothing written
    with pytest.raises(StoreError, match="--assets"):
        open_store(tmp_path / "home2", assets="nosuchfs://bucket/x")


# ------------------------------------------------------------------------------------ fsspec asset files
@pytest.fixture(params=["file", "memory"])
def assets_url(request, tmp_path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'bucket' / 'atelier'}"
    return f"memory://atelier-{uuid.uuid4().hex[:8]}/assets"


def test_fsspec_assets_live_at_the_url_and_are_read_through_a_cache(assets_url, tmp_path) -> None:
    home = tmp_path / "home"
    store = open_store(home, assets=assets_url)
    files = store.files
    assert isinstance(files, FsspecFiles)
    lineage.start_run(store, "run1", "c", "b", "0" * 64, "tiny", {})
    save(store, "run1", [_asset("k1", b"one"), _asset("k2", b"two", [("k1", "source")])])
    sha = hashlib.sha256(b"two").hexdigest()
    fs, root = fsspec.core.url_to_fs(assets_url)
    with store.sessions() as s:
        row = s.get(Asset, "k2")
        assert row.path == f"assets/{sha[:2]}/{sha}.png"  # rows do not depend on where the files are
        assert set(queries.existing(s, files, ["k1", "k2", "nope"])) == {"k1", "k2"}
    assert fs.cat_file(f"{root}/{sha[:2]}/{sha}.png") == b"two"
    assert fs.ls(f"{root}/.tmp") == []  # temp objects moved into place
    assert not (home / "assets").exists()  # nothing in the home's asset folder
    # Stages read local files: a cached copy, downloaded again (and checked) when the cache is gone.
    local = files.path(row.path)
    assert local.is_relative_to(home / "cache") and local.read_bytes() == b"two"
    local.unlink()
    assert files.path(row.path).read_bytes() == b"two"
    # Reuse asks the object store, not the cache: a lost object is recomputed.
    fs.rm_file(f"{root}/{sha[:2]}/{sha}.png")
    with store.sessions() as s:
        assert set(queries.existing(s, files, ["k1", "k2"])) == {"k1"}
    lineage.start_run(store, "run2", "c", "b", "0" * 64, "tiny", {})
    save(store, "run2", [_asset("k2", b"two, again", [("k1", "source")])])
    with store.sessions() as s:
        assert set(queries.existing(s, files, ["k2"])) == {"k2"}
        assert s.get(RunAsset, ("run2", "k2")).status == "computed"
        assert files.path(s.get(Asset, "k2").path).read_bytes() == b"two, again"


def test_fsspec_committed_bytes_left_in_tmp_win_over_a_recomputation(assets_url, tmp_path) -> None:
    """As after kill -9 between commit and move: the next save() moves the committed bytes into place."""
    store = open_store(tmp_path / "home", assets=assets_url)
    files = store.files
    lineage.start_run(store, "run1", "c", "b", "0" * 64, "tiny", {})
    save(store, "run1", [_asset("k1", b"first bytes")])
    with store.sessions() as s:
        rel = s.get(Asset, "k1").path
    final = files.remote(rel)
    files.fs.mv(final, f"{files.tmp_dir}/{Path(final).stem}.abcdef.png")
    with store.sessions() as s:
        assert queries.existing(s, files, ["k1"]) == {}
    lineage.start_run(store, "run2", "c", "b", "0" * 64, "tiny", {})
    save(store, "run2", [_asset("k1", b"second bytes")])
    assert files.fs.cat_file(final) == b"first bytes" and files.fs.ls(files.tmp_dir) == []
    with store.sessions() as s:
        assert s.get(RunAsset, ("run2", "k1")).status == "reused"


def test_atelier_assets_environment_variable_is_the_default(tmp_path, monkeypatch) -> None:
    url = f"memory://atelier-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ATELIER_ASSETS", url)
    store = open_store(tmp_path / "home")
    assert isinstance(store.files, FsspecFiles) and store.files.location == url


def test_doctor_finds_and_repairs_damage_in_an_object_store(postgres_url, tmp_path) -> None:
    from store.doctor import check, repair

    assets = f"memory://atelier-{uuid.uuid4().hex[:8]}/assets"
    store = open_store(tmp_path / "home", postgres_url, assets)
    files = store.files
    lineage.start_run(store, "run1", "c", "b", "0" * 64, "tiny", {})
    save(store, "run1", [_asset("a", b"kept"), _asset("b", b"lost"), _asset("c", b"rotten"), _asset("d", b"late")])
    lineage.finish_run(store, "run1")
    assert check(store).healthy
    with store.sessions() as s:
        rel = {k: s.get(Asset, k).path for k in "abcd"}
    files.fs.rm_file(files.remote(rel["b"]))  # missing-file
    files.fs.pipe_file(files.remote(rel["c"]), b"bit rot")  # bad-hash
    files.fs.mv(files.remote(rel["d"]), f"{files.tmp_dir}/{Path(rel['d']).stem}.x1y2z3.png")  # unpublished
    files.fs.pipe_file(f"{files.root}/ab/{'ab' + '0' * 62}.png", b"nobody's")  # stray-file
    files.stage(b"abandoned", ".png")  # stale-temp, with stale_after=0
    report = check(store, stale_after=0)
    assert sorted((p.kind, p.subject) for p in report.problems if p.kind != "stray-file" and p.kind != "stale-temp") \
        == [("bad-hash", "c"), ("missing-file", "b"), ("unpublished", "d")]
    assert {p.kind for p in report.problems} == {"bad-hash", "missing-file", "unpublished", "stray-file", "stale-temp"}
    repair(store, report)
    assert check(store, stale_after=0).healthy
    with store.sessions() as s:
        assert set(s.scalars(select(Asset.key))) == {"a", "d"}
    assert files.fs.cat_file(files.remote(rel["d"])) == b"late"
    assert files.fs.cat_file(f"{files.root}/.quarantine/{rel['c'].removeprefix('assets/')}") == b"bit rot"


def test_open_store_never_guesses_the_assets_from_an_earlier_open(tmp_path, monkeypatch) -> None:
    """A run opens its store once, with its assets URL, and passes it on: a later open that names no assets
    location gets ``<home>/assets`` ($ATELIER_ASSETS unset), whatever this process opened before."""
    monkeypatch.delenv("ATELIER_ASSETS", raising=False)
    url = f"memory://atelier-{uuid.uuid4().hex[:8]}"
    first = open_store(tmp_path / "home", assets=url)
    assert first.files.location == url
    again = open_store(tmp_path / "home")
    assert again is not first and again.files.location == str((tmp_path / "home").resolve() / "assets")
