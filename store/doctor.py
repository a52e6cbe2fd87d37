"""Integrity check and repair of an atelier home: lineage rows against asset files, and runs against processes.

``check(store)`` changes nothing. It reports *problems* (the home is not healthy) and *notes* (work in
flight, or what cannot be checked from here). Problem kinds:

- ``missing-file``: an asset row whose file is neither in ``assets/`` nor waiting in ``assets/.tmp``;
- ``bad-hash``: an asset file whose bytes do not hash to its row's sha256;
- ``unpublished``: a row committed by a ``save()`` whose process died before moving the file into place;
  the committed bytes are still in ``assets/.tmp``;
- ``stray-file``: a file under ``assets/`` that no row points at;
- ``stale-temp``: a file in ``assets/.tmp`` older than ``stale_after`` that no row is waiting for;
- ``dangling-edge`` / ``dangling-run-asset`` / ``dangling-score`` / ``dangling-stage-run`` /
  ``asset-without-run``: a row that points at an asset or run that does not exist;
- ``sqlite-integrity`` / ``foreign-key``: what SQLite's own ``integrity_check`` / ``foreign_key_check``
  find (the latter in tables the checks above do not cover);
- ``dead-run``: a run still "running" whose process is gone (same host; pid and process start time are
  recorded in ``Run.info`` by ``lineage.start_run``).

What a ``kill -9`` of a run legitimately leaves behind is ``CRASH_DEBRIS``: the dead run, temp files,
and rows whose bytes are still in ``assets/.tmp``. Nothing else is expected, ever.

``repair(store, report)`` fixes what it can and returns what it did: it marks dead runs failed, moves
committed bytes into place, deletes stale temp files, moves stray files to ``<home>/quarantine/``, and
deletes rows whose file is missing or corrupt together with everything computed from them (their
descendants, and the selection decisions that scored them), so the next run recomputes them. Each action
re-checks its premise first, so repairing while runs are going on is safe.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from store import lineage
from store.db import Store, default_url
from store.files import Staged
from store.lineage import process_start
from store.schema import Asset, Edge, Run, RunAsset, Score, StageRun

STALE_AFTER = 300.0  # seconds; a save() keeps a temp file for at most busy_timeout (30 s) plus a write
CRASH_DEBRIS = frozenset({"dead-run", "unpublished", "stale-temp"})
_CHECKED_TABLES = {"edges", "run_assets", "scores", "assets", "stage_runs"}  # foreign keys checked below


@dataclass(frozen=True)
class Problem:
    kind: str
    subject: str  # an asset key, a path relative to the home, a run id
    detail: str
    fix: str | None  # what repair() does about it; None: nothing it can do
    ref: tuple = ()  # what repair() needs to find it again


@dataclass
class Report:
    home: str
    store: str
    assets: str = ""  # where the asset files are: <home>/assets or an fsspec URL
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def to_dict(self) -> dict:
        return {"home": self.home, "store": self.store, "assets": self.assets, "healthy": self.healthy,
                "counts": self.counts,
                "problems": problem_dicts(self.problems), "notes": problem_dicts(self.notes)}


def problem_dicts(problems: list[Problem]) -> list[dict]:
    return [{"kind": p.kind, "subject": p.subject, "detail": p.detail, "fix": p.fix} for p in problems]


# ------------------------------------------------------------------------------------------------ check
def check(store: Store, stale_after: float = STALE_AFTER) -> Report:
    """Check ``store``'s home without changing anything. ``stale_after``: age (s) of an abandoned temp file."""
    report = Report(home=str(store.home), store=_shown(store.url), assets=store.files.location)
    # 1. Files first, rows second: a file is moved into place only after its row committed, so every file
    #    listed here has its row visible below (no false "stray" while runs are going on).
    files = store.files.list_files()
    temps = store.files.temp_files()
    with store.sessions() as s:
        assets = {a.key: (a.path, a.sha256, a.run_id) for a in s.scalars(select(Asset))}
        runs = {r.id: r for r in s.scalars(select(Run))}
        alive = {run_id for run_id, r in runs.items() if r.status == "running" and _alive(r.info or {}) is not False}
        # 2. The database itself, and rows pointing at rows that do not exist.
        _check_sqlite(s, report)
        _check_references(s, report)
        report.counts = {"assets": len(assets), "files": len(files), "temp_files": len(temps), "runs": len(runs),
                         "edges": s.scalar(select(func.count()).select_from(Edge)),
                         "scores": s.scalar(select(func.count()).select_from(Score))}
    # 3. Every row has its file, with its bytes.
    claimed: set[Path] = set()
    digests: dict[str, str] = {}
    for key, (rel, sha, run_id) in sorted(assets.items()):
        if store.files.exists(rel):
            if rel not in digests:  # rows may share a file (a draft and its selection)
                digests[rel] = store.files.sha256(rel)
            if (digest := digests[rel]) != sha:
                report.problems.append(Problem(
                    "bad-hash", key, f"{rel}: sha256 {digest[:12]}…, row says {sha[:12]}…",
                    "quarantine the file; delete the row and what was computed from it", (key, rel)))
            continue
        staged = store.files.find_staged(sha, Path(rel).suffix)  # looked up now: it may be newer than `temps`
        age = store.files.age(staged.tmp) if staged is not None else None
        if age is not None:
            tmp = staged.tmp
            claimed.add(tmp)
            rel_tmp = store.files.describe(tmp)
            if run_id in alive and age < stale_after:
                report.notes.append(Problem("in-flight", key, f"committed by live run {run_id}, moving into place",
                                            None))
            else:
                report.problems.append(Problem("unpublished", key, f"{rel}: committed bytes still in {rel_tmp}",
                                               "move them into place", (key, rel, sha, tmp)))
        elif not store.files.exists(rel):  # (again: it may have arrived meanwhile)
            report.problems.append(Problem("missing-file", key, f"{rel} is missing",
                                           "delete the row and what was computed from it", (key, rel)))
    # 4. Every file has a row; temp files belong to a save() in flight, else they are debris.
    referenced = {rel for rel, _, _ in assets.values()}
    for rel in sorted(files - referenced):
        report.problems.append(Problem("stray-file", rel, "no asset row points at this file", "move to quarantine/",
                                       (rel,)))
    for tmp, age in sorted(temps.items()):
        if tmp in claimed:
            continue
        rel = store.files.describe(tmp)
        if age >= stale_after:
            report.problems.append(Problem("stale-temp", rel, f"temp file abandoned {age:.0f}s ago", "delete",
                                           (tmp,)))
        else:
            report.notes.append(Problem("in-flight", rel, f"temp file written {age:.0f}s ago", None))
    # 5. Runs still "running": is their process alive?
    for _, r in sorted(runs.items()):
        if r.status == "running":
            _check_run(r, report)
    return report


def _shown(url: str) -> str:
    """The store URL without its password."""
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def unreadable(home: Path, url: str | None, error: Exception) -> Report:
    """The report on a store that cannot even be opened (``error``: what opening it raised)."""
    detail = str(getattr(error, "orig", None) or error)
    return Report(home=str(home), store=url or default_url(home),
                  problems=[Problem("sqlite-integrity", "lineage.db", f"cannot be read: {detail}", None)])


def _check_sqlite(s: Session, report: Report) -> None:
    if s.get_bind().dialect.name != "sqlite":
        return
    rows = [r[0] for r in s.execute(text("PRAGMA integrity_check"))]
    if rows != ["ok"]:
        for msg in rows:  # no automatic repair: restore a copy, or `sqlite3 lineage.db .recover`
            report.problems.append(Problem("sqlite-integrity", "lineage.db", msg, None))
    for table, rowid, parent, _fk in s.execute(text("PRAGMA foreign_key_check")):
        if table not in _CHECKED_TABLES:
            report.problems.append(Problem("foreign-key", f"{table}:{rowid}", f"points at a missing {parent} row",
                                           None))


def _check_references(s: Session, report: Report) -> None:
    """Rows pointing at assets or runs that do not exist (any database; SQLite enforces most of it)."""
    asset_keys, run_ids = select(Asset.key), select(Run.id)
    for e in s.scalars(select(Edge).where(Edge.child.not_in(asset_keys) | Edge.parent.not_in(asset_keys))):
        report.problems.append(Problem("dangling-edge", e.child, f"edge {e.parent} → {e.child} ({e.role}): an end is "
                                       "missing", "delete it and what was computed from its child",
                                       (e.child, e.parent, e.role)))
    dangling = RunAsset.asset_key.not_in(asset_keys) | RunAsset.run_id.not_in(run_ids)
    for ra in s.scalars(select(RunAsset).where(dangling)):
        report.problems.append(Problem("dangling-run-asset", ra.asset_key, f"run {ra.run_id} lists a missing asset "
                                       "or is itself missing", "delete the membership", (ra.run_id, ra.asset_key)))
    for sc in s.scalars(select(Score).where(Score.draft_key.not_in(asset_keys))):
        report.problems.append(Problem("dangling-score", sc.draft_key, f"decision {sc.decision} scores a missing "
                                       "draft", "delete the decision and its selections", (sc.decision,)))
    for a in s.scalars(select(Asset).where(Asset.run_id.not_in(run_ids))):
        report.problems.append(Problem("asset-without-run", a.key, f"computed by run {a.run_id}, which is missing",
                                       "delete the row and what was computed from it", (a.key, a.path)))
    for sr in s.scalars(select(StageRun).where(StageRun.run_id.not_in(run_ids))):
        report.problems.append(Problem("dangling-stage-run", str(sr.id), f"stage {sr.stage} of missing run "
                                       f"{sr.run_id}", "delete it", (sr.id,)))


def _alive(info: dict) -> bool | None:
    """Whether the process that started a run still runs: None when it cannot be told from here."""
    pid, host = info.get("pid"), info.get("host")
    if pid is None or host != socket.gethostname():
        return None
    if Path("/proc").is_dir():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        state = stat[stat.rindex(")") + 2:].split()[0]
        started = info.get("process_start")
        return state not in ("Z", "X") and (started is None or started == process_start(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _check_run(run: Run, report: Report) -> None:
    info = run.info or {}
    alive = _alive(info)
    if alive is False:
        report.problems.append(Problem("dead-run", run.id, f"status running, but process {info['pid']} on "
                                       f"{info['host']} is gone", "mark it failed", (run.id,)))
    elif alive:
        report.notes.append(Problem("running", run.id, f"process {info['pid']} is running", None))
    else:
        where = f"on host {info['host']}" if info.get("host") else "with no process recorded"
        report.notes.append(Problem("running", run.id, f"status running {where}: cannot check from here", None))


# ----------------------------------------------------------------------------------------------- repair
def repair(store: Store, report: Report) -> list[str]:
    """Fix ``report``'s repairable problems; returns one line per action taken."""
    done: list[str] = []
    by_kind: dict[str, list[Problem]] = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p)
    # 1. Runs whose process died: failed.
    for p in by_kind.get("dead-run", []):
        with store.sessions.begin() as s:
            run = s.get(Run, p.ref[0])
            if run is not None and _alive(run.info or {}) is False and lineage.mark_dead_run(
                    s, run.id, "process died (found by atelier doctor)"):
                done.append(f"run {run.id}: marked failed")
    # 2. Committed bytes left in assets/.tmp: move them into place (finishing the interrupted save()).
    for p in by_kind.get("unpublished", []):
        key, rel, sha, tmp = p.ref
        if store.files.temp_exists(tmp) and not store.files.exists(rel):
            store.files.publish(Staged(tmp, sha, rel))
            done.append(f"asset {key}: moved {Path(tmp).name} into place")
    # 3. Rows whose bytes are lost or corrupt, and rows pointing nowhere: delete them and their descendants.
    doomed = {p.ref[0] for p in by_kind.get("missing-file", []) if not store.files.exists(p.ref[1])}
    corrupt = {p.ref[1] for p in by_kind.get("bad-hash", [])
               if store.files.exists(p.ref[1]) and store.files.sha256(p.ref[1]) != _sha_of(store, p.ref[0])}
    doomed |= {p.ref[0] for p in by_kind.get("bad-hash", []) if p.ref[1] in corrupt}
    doomed |= {p.ref[0] for p in by_kind.get("asset-without-run", [])}
    decisions = {p.ref[0] for p in by_kind.get("dangling-score", [])}
    dangling = by_kind.get("dangling-edge", []) + by_kind.get("dangling-run-asset", []) + by_kind.get(
        "dangling-stage-run", [])
    if doomed or decisions or dangling:
        with store.sessions.begin() as s:
            edges = [tuple(p.ref) for p in by_kind.get("dangling-edge", [])]
            doomed |= {child for child, parent, _ in edges if s.get(Asset, parent) is None}  # lineage broken
            lineage.delete_rows(s, edges=edges,
                                run_assets=[tuple(p.ref[:2]) for p in by_kind.get("dangling-run-asset", [])],
                                stage_runs=[p.ref[0] for p in by_kind.get("dangling-stage-run", [])])
            deleted, paths = lineage.delete_assets(s, doomed, decisions)
        done += [f"asset {k}: deleted" + ("" if k in doomed else ", as it was computed from a deleted one")
                 for k in sorted(deleted)]
        done += [f"{p.kind} {p.subject}: deleted" for p in dangling]
        # Files only the deleted rows pointed at would be strays now: quarantine them (the corrupt ones too).
        with store.sessions() as s:
            kept = set(s.scalars(select(Asset.path).where(Asset.path.in_(paths))))
        for rel in sorted((paths | corrupt) - kept):
            if store.files.exists(rel):
                done.append(f"{rel}: moved to {store.files.quarantine(rel)}")
    # 4. Files no row points at: quarantine. 5. Abandoned temp files: delete.
    for p in by_kind.get("stray-file", []):
        rel = p.ref[0]
        with store.sessions() as s:
            claimed = s.scalar(select(Asset.key).where(Asset.path == rel).limit(1))
        if claimed is None and store.files.exists(rel):
            done.append(f"{rel}: moved to {store.files.quarantine(rel)}")
    for p in by_kind.get("stale-temp", []):
        tmp = p.ref[0]
        if store.files.temp_exists(tmp):
            store.files.discard(Staged(tmp, "", ""))
            done.append(f"{p.subject}: deleted")
    return done


def _sha_of(store: Store, key: str) -> str | None:
    with store.sessions() as s:
        a = s.get(Asset, key)
        return a.sha256 if a else None
