"""`atelier doctor`: every kind of damage is found, repaired to a healthy home, and the CLI says so.

The tests taking ``store`` run on SQLite and on a real PostgreSQL server (tests/postgres.py)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from store import NewAsset, NewScore, lineage, open_store, queries, save
from store.doctor import check, repair
from store.schema import Asset, Edge, Run, RunAsset, Score

KEYS = ("r1", "d1", "d2", "s1", "f1", "u1")


def _asset(key: str, data: bytes, stage: str, parents=(), params=None, suffix: str = ".png") -> NewAsset:
    return NewAsset(key=key, stage=stage, kind="image", campaign="c", deliverable="d", data=data, suffix=suffix,
                    params=params or {}, parents=tuple(parents))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return _lineage(tmp_path / "home", url)


@pytest.fixture
def sqlite_store(tmp_path):
    return _lineage(tmp_path / "home")


def _lineage(home: Path, url: str | None = None):
    """A small, healthy lineage: reference r1; drafts d1, d2 scored by decision "dec" (d1 kept as s1, same
    bytes); f1 refined from s1 with r1 as style reference; u1 an unrelated draft."""
    st = open_store(home, url)
    lineage.start_run(st, "run1", "c", "brief.yaml", "0" * 64, "tiny", {})
    save(st, "run1", [_asset("r1", b"reference", "reference", suffix=".jpg")])
    save(st, "run1", [_asset("d1", b"draft one", "draft"), _asset("d2", b"draft two", "draft")])
    save(st, "run1", [_asset("s1", b"draft one", "select", [("d1", "source")], {"decision": "dec", "rank": 1})],
         [NewScore("dec", "d1", 0.3, 0.2, 0.0, 0.4, 1, True), NewScore("dec", "d2", 0.1, 0.1, 0.1, 0.1, None, False)])
    save(st, "run1", [_asset("f1", b"refined", "refine", [("s1", "init"), ("r1", "style-ref")])])
    save(st, "run1", [_asset("u1", b"unrelated", "draft")])
    lineage.finish_run(st, "run1")
    return st


def _where(st) -> list[str]:
    """The CLI options that name ``st``."""
    return ["--home", str(st.home)] + ([] if st.dialect == "sqlite" else ["--store", st.url])


def _path(st, key: str) -> Path:
    with st.sessions() as s:
        return st.home / s.get(Asset, key).path


def _keys(st) -> set[str]:
    with st.sessions() as s:
        return set(s.scalars(select(Asset.key)))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _set_run_info(st, run_id: str, **info) -> None:
    with st.sessions.begin() as s:
        run = s.get(Run, run_id)
        run.info = {**run.info, **info}
        run.status = "running"


def test_a_healthy_home_is_healthy(store) -> None:
    report = check(store)
    assert report.healthy and report.problems == [] and report.notes == []
    assert report.counts == {"assets": 6, "files": 5, "temp_files": 0, "runs": 1, "edges": 3, "scores": 2}
    assert repair(store, report) == []
    res = CliRunner().invoke(app, ["doctor", *_where(store)])
    assert res.exit_code == 0 and "healthy" in res.output and "6 assets, 5 files" in res.output


def test_a_missing_file_takes_its_row_and_everything_computed_from_it(store) -> None:
    _path(store, "d2").unlink()  # the draft that was scored but not kept
    report = check(store)
    assert [(p.kind, p.subject) for p in report.problems] == [("missing-file", "d2")]
    f1_file = _path(store, "f1")
    done = repair(store, report)
    # d2 goes; its selection decision goes whole (s1, both scores), and f1 that was refined from s1.
    assert _keys(store) == {"r1", "d1", "u1"}
    with store.sessions() as s:
        assert s.scalars(select(Score)).all() == [] and s.scalars(select(Edge)).all() == []
        assert {ra.asset_key for ra in s.scalars(select(RunAsset))} == {"r1", "d1", "u1"}
        assert queries.existing(s, store.files, KEYS).keys() == {"r1", "d1", "u1"}  # the rest gets recomputed
    # d1's file stays (d1 still points at it); f1's file went to quarantine, not to the bin.
    assert _path(store, "d1").exists() and not f1_file.exists()
    assert (store.home / "quarantine" / f1_file.relative_to(store.home)).read_bytes() == b"refined"
    assert any("f1" in line for line in done)
    assert check(store).healthy


def test_a_corrupt_file_is_quarantined_and_its_row_deleted(store) -> None:
    f1 = _path(store, "f1")
    f1.write_bytes(b"bit rot")
    report = check(store)
    assert [(p.kind, p.subject) for p in report.problems] == [("bad-hash", "f1")]
    repair(store, report)
    assert _keys(store) == {"r1", "d1", "d2", "s1", "u1"} and not f1.exists()
    assert (store.home / "quarantine" / f1.relative_to(store.home)).read_bytes() == b"bit rot"
    assert check(store).healthy


def test_a_stray_file_is_quarantined(store) -> None:
    stray = store.home / "assets" / "ab" / ("ab" + "0" * 62 + ".png")
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"nobody's")
    report = check(store)
    assert [(p.kind, p.subject) for p in report.problems] == [("stray-file", str(stray.relative_to(store.home)))]
    repair(store, report)
    assert not stray.exists() and (store.home / "quarantine" / stray.relative_to(store.home)).exists()
    assert check(store).healthy and _keys(store) == set(KEYS)


def test_temp_files_are_in_flight_until_stale(store) -> None:
    tmp = store.files.stage(b"being saved", ".png").tmp  # as a save() in progress leaves it
    report = check(store)
    assert report.healthy and [n.kind for n in report.notes] == ["in-flight"]
    assert check(store, stale_after=0).kinds() == {"stale-temp"}
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    report = check(store)
    assert [(p.kind, p.subject) for p in report.problems] == [("stale-temp", str(tmp.relative_to(store.home)))]
    repair(store, report)
    assert not tmp.exists() and check(store).healthy


def test_committed_bytes_left_in_tmp_by_a_dead_run_are_moved_into_place(store) -> None:
    # As after kill -9 between commit and rename: the row is committed, its bytes are still in assets/.tmp.
    f1 = _path(store, "f1")
    tmp = store.files.tmp_dir / f"{f1.stem}.x1y2z3{f1.suffix}"
    os.replace(f1, tmp)
    _set_run_info(store, "run1", pid=_dead_pid())
    report = check(store)
    assert {(p.kind, p.subject) for p in report.problems} == {("unpublished", "f1"), ("dead-run", "run1")}
    done = repair(store, report)
    assert f1.read_bytes() == b"refined" and not tmp.exists()
    with store.sessions() as s:
        run = s.get(Run, "run1")
        assert run.status == "failed" and "doctor" in run.error
    assert len(done) == 2 and check(store).healthy


def test_bytes_in_tmp_of_a_live_run_are_left_alone(store) -> None:
    f1 = _path(store, "f1")
    tmp = store.files.tmp_dir / f"{f1.stem}.x1y2z3{f1.suffix}"
    os.replace(f1, tmp)
    _set_run_info(store, "run1")  # still running, in this very process: the save() is about to rename
    report = check(store)
    assert report.healthy and {n.kind for n in report.notes} == {"in-flight", "running"}
    assert not check(store, stale_after=0).healthy  # unless nothing may be in flight


def test_runs_whose_process_is_gone_are_found(store) -> None:
    me = {"pid": os.getpid(), "process_start": lineage.process_start(os.getpid())}
    _set_run_info(store, "run1", **me)
    assert check(store).healthy  # this process runs
    _set_run_info(store, "run1", process_start=me["process_start"] + 1)  # same pid, another process: reused
    assert check(store).kinds() == {"dead-run"}
    _set_run_info(store, "run1", host="elsewhere", pid=_dead_pid())  # cannot be told from here: a note
    report = check(store)
    assert report.healthy and "cannot check" in report.notes[0].detail


def test_rows_pointing_nowhere_are_deleted_with_what_depends_on_them(store) -> None:
    # Delete d1 behind SQLAlchemy's back with foreign keys off, as an older or foreign writer might.
    if store.dialect == "sqlite":
        db = sqlite3.connect(store.home / "lineage.db")
        db.execute("DELETE FROM assets WHERE key = 'd1'")
        db.commit()
        db.close()
    else:
        with store.sessions.kw["bind"].begin() as conn:  # replica role: foreign-key triggers do not fire
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            conn.exec_driver_sql("DELETE FROM assets WHERE key = 'd1'")
    report = check(store)
    assert report.kinds() == {"dangling-edge", "dangling-run-asset", "dangling-score"}
    assert not any(p.kind == "foreign-key" for p in report.problems)  # not reported twice
    repair(store, report)
    # s1 lost its parent, so it goes, and f1 refined from it; the file d1 and s1 shared goes to quarantine.
    assert _keys(store) == {"r1", "d2", "u1"}
    assert check(store).healthy


def test_sqlite_corruption_is_reported_not_repaired(sqlite_store) -> None:
    store = sqlite_store
    # Re-declare an index over another column: its entries no longer match the table. Only SQLite's own
    # integrity_check can tell.
    db = sqlite3.connect(store.home / "lineage.db")
    db.execute("PRAGMA writable_schema = ON")
    db.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX ix_assets_stage ON assets (campaign)' "
               "WHERE name = 'ix_assets_stage'")
    db.commit()
    db.close()
    store.sessions.kw["bind"].dispose()  # reconnect: the schema changed
    report = check(store)
    assert report.kinds() == {"sqlite-integrity"} and all(p.fix is None for p in report.problems)
    res = CliRunner().invoke(app, ["doctor", "--home", str(store.home), "--repair", "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["problems"][0]["kind"] == "sqlite-integrity"


def test_an_unreadable_database_is_reported(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "lineage.db").write_bytes(b"this is not a database" * 100)
    res = CliRunner().invoke(app, ["doctor", "--home", str(home), "--json"])
    data = json.loads(res.output)
    assert res.exit_code == 1 and [p["kind"] for p in data["problems"]] == ["sqlite-integrity"]
    assert "not a database" in data["problems"][0]["detail"]


def test_cli_exit_codes_and_json(store, tmp_path) -> None:
    runner = CliRunner()
    stray = store.home / "assets" / "ab" / "stray.png"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    _set_run_info(store, "run1", pid=_dead_pid())
    res = runner.invoke(app, ["doctor", *_where(store)], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "stray-file" in res.output and "dead-run" in res.output
    assert "2 problem(s); 2 fixable with --repair" in res.output
    res = runner.invoke(app, ["doctor", *_where(store), "--json"])
    data = json.loads(res.output)
    assert res.exit_code == 1 and not data["healthy"] and {p["kind"] for p in data["problems"]} == {"stray-file",
                                                                                                     "dead-run"}
    res = runner.invoke(app, ["doctor", *_where(store), "--repair", "--json"])
    data = json.loads(res.output)
    assert res.exit_code == 0 and data["healthy"] and data["problems"] == []
    assert {p["kind"] for p in data["found"]} == {"stray-file", "dead-run"} and len(data["repaired"]) == 2
    assert runner.invoke(app, ["doctor", *_where(store)]).exit_code == 0


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path) -> None:
    res = subprocess.run([str(Path(sys.executable).with_name("atelier")), "doctor", "--home", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no lineage store" in res.stderr
    assert not (tmp_path / "none").exists()  # nothing was written
    open_store(tmp_path / "home")
    res = CliRunner().invoke(app, ["doctor", "--home", str(tmp_path / "home"), "--stale-minutes", "-1"])
    assert res.exit_code == 2 and "--stale-minutes" in res.output
