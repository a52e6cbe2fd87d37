"""The one place lineage is written.

``save()`` follows the crash-safe order: write every file to a temp path, insert the rows and commit
in one short transaction, then move the files into place. A crash before the commit leaves only temp
files (never referenced); a crash after it leaves rows whose files are still in ``assets/.tmp`` —
``store.queries.existing`` treats such assets as missing, so the next run recomputes them, and its
``save()`` moves the committed bytes into place (so lineage keeps the bytes first recorded) or, if they
are gone, points the row at the new file. ``atelier doctor`` finds and repairs what a crash leaves.
Ctrl-C and SIGTERM wait for a ``save()`` to finish (``atelier.interrupts.deferred``): an interrupted run
leaves no such debris, only its status, ``cancelled``. A write that fails (a full disk) removes its temp files.

Crash tests kill the process inside ``save()`` on purpose: ``ATELIER_FAULT=<point>`` with
``ATELIER_FAULT_AFTER=N`` sends SIGKILL to this process at ``<point>`` of its N-th ``save()`` call (see
``FAULT_POINTS``; the store counts its ``save()`` calls). Unset, it costs one dictionary lookup per point.

``atelier doctor``'s repairs write through this module too (``mark_dead_run``, ``delete_rows``,
``delete_assets``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from atelier import interrupts
from store.db import Store
from store.files import Staged
from store.schema import Asset, Edge, Gate, Rating, Review, Run, RunAsset, Score, StageRun

FAULT_POINTS = (
    "after-stage",  # files written to assets/.tmp, no row yet
    "before-commit",  # rows inserted and flushed inside the open transaction, COMMIT not sent
    "in-commit",  # a timer thread kills while this thread runs COMMIT (ATELIER_FAULT_DELAY_MS, default 0)
    "after-commit",  # committed, no file moved into place
    "mid-publish",  # the first file moved into place, the others still in assets/.tmp
)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class NewAsset:
    key: str
    stage: str
    kind: str  # image | mask | embedding
    campaign: str
    deliverable: str | None
    data: bytes  # the encoded file (PNG; a mood board's .npz)
    suffix: str
    params: dict
    model: dict | None = None
    width: int | None = None
    height: int | None = None
    seconds: float = 0.0
    parents: tuple[tuple[str, str], ...] = ()  # (parent key, role)


@dataclass(frozen=True)
class NewScore:
    decision: str
    draft_key: str
    prompt_score: float
    moodboard_score: float
    diversity_penalty: float
    total: float
    rank: int | None
    kept: bool


def save(store: Store, run_id: str, assets: Sequence[NewAsset], scores: Sequence[NewScore] = ()) -> dict[str, str]:
    """Persist new assets (files + rows + edges + run membership) and selection scores. Idempotent.

    Returns the sha256 of each asset's given bytes, by key (the stored file has these bytes unless the key
    was recorded first, with other bytes, by another run).

    If another process stored the same key meanwhile, its row wins and ours is counted as reused. Rows go
    in with ``INSERT ... ON CONFLICT DO NOTHING``: on SQLite the write transaction holds the lock anyway
    (``BEGIN IMMEDIATE``); on PostgreSQL, where writers run side by side, the second insert of a key waits
    for the first to commit and then does nothing. Keys are inserted in sorted order, so two writers of
    overlapping batches take their row locks in the same order and cannot deadlock.
    """
    call = store.count_save()
    with interrupts.deferred():  # Ctrl-C / SIGTERM wait for the files to be in place (milliseconds)
        return _save(store, call, run_id, assets, scores)


def _save(store: Store, call: int, run_id: str, assets: Sequence[NewAsset], scores: Sequence[NewScore]) -> dict[str, str]:
    staged: list[Staged] = []
    publish, drop = [], []  # temp files to move into place / to delete after the commit
    try:
        for a in assets:
            staged.append(_stage(store, a))
        _fault("after-stage", call)
        with store.sessions.begin() as s:
            for a, st in sorted(zip(assets, staged), key=lambda pair: pair[0].key):
                if _insert_new(s, Asset, dict(
                        key=a.key, stage=a.stage, kind=a.kind, campaign=a.campaign, deliverable=a.deliverable,
                        path=st.rel_path, sha256=st.sha256, width=a.width, height=a.height,
                        params=_jsonable(a.params), model=a.model, seconds=a.seconds, run_id=run_id,
                        created_at=utcnow())):
                    for pos, (parent, role) in enumerate(a.parents):
                        _insert_new(s, Edge, dict(child=a.key, parent=parent, role=role, position=pos))
                    status = "computed"
                    publish.append(st)
                else:  # stored already: lock the row while deciding whose bytes it keeps
                    row = s.get(Asset, a.key, with_for_update=True, populate_existing=True)
                    status = _resolve_existing(store, row, a, st, run_id, publish, drop)
                _insert_new(s, RunAsset, dict(run_id=run_id, asset_key=a.key, status=status, final=False))
            for sc in scores:
                _upsert(s, Score, sc.__dict__, ("decision", "draft_key"))
            s.flush()
            _fault("before-commit", call)
            _fault("in-commit", call)
        _fault("after-commit", call)
    except BaseException:
        for st in staged:
            store.files.discard(st)
        raise
    for i, st in enumerate(publish):
        store.files.publish(st)
        if i == 0:
            _fault("mid-publish", call)
    for st in drop:
        store.files.discard(st)
    return {a.key: st.sha256 for a, st in zip(assets, staged)}


def _stage(store: Store, a: NewAsset) -> Staged:
    """``a``'s bytes in a temp file; an error names the asset (a full disk fails the run with this line)."""
    try:
        return store.files.stage(a.data, a.suffix)
    except OSError as exc:
        what = (f"could not write the {a.stage} asset {a.key} of {a.deliverable or 'the campaign'} "
                f"({len(a.data):,} bytes) to {store.files.location}")
        if exc.errno is None:
            raise OSError(f"{exc}: {what}") from exc
        raise OSError(exc.errno, f"{exc.strerror}: {what}") from exc  # the same OSError subclass, by errno


def _insert(s: Session):
    """The dialect's ``insert`` with ``on_conflict_*`` (SQLite and PostgreSQL both have them)."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"atelier stores lineage in SQLite or PostgreSQL, not {name}")
    return insert


def _insert_new(s: Session, model: type, values: dict) -> bool:
    """``INSERT ... ON CONFLICT DO NOTHING``; True when this call inserted the row."""
    pk = [c for c in model.__table__.primary_key.columns]
    stmt = _insert(s)(model).values(**values).on_conflict_do_nothing(index_elements=pk).returning(*pk)
    return s.execute(stmt).first() is not None


def _upsert(s: Session, model: type, values: dict, key: tuple[str, ...]) -> None:
    """``INSERT ... ON CONFLICT (key) DO UPDATE``: the last writer's values win, as with ``Session.merge``."""
    stmt = _insert(s)(model).values(**values)
    s.execute(stmt.on_conflict_do_update(index_elements=list(key),
                                         set_={k: stmt.excluded[k] for k in values if k not in key}))


def _resolve_existing(store: Store, row: Asset, a: NewAsset, st: Staged, run_id: str, publish: list[Staged],
                      drop: list[Staged]) -> str:
    """``a.key`` is stored already: decide which bytes the row keeps. Returns the run's status for it."""
    if row.sha256 == st.sha256:
        publish.append(st)  # same bytes: puts the file in place if it is missing, else drops ours
        return "reused"
    in_place = store.files.exists(row.path)
    committed = None if in_place else store.files.find_staged(row.sha256, Path(row.path).suffix)
    if committed is not None:
        publish.append(committed)  # a save() committed these bytes, then died before moving them into place
    if committed is not None or store.files.exists(row.path):  # (again: its owner may just have moved it)
        drop.append(st)  # the recorded bytes win, e.g. over a non-deterministic recomputation
        return "reused"
    # The recorded bytes are gone: this computation replaces them.
    row.path, row.sha256, row.width, row.height = st.rel_path, st.sha256, a.width, a.height
    row.params, row.model, row.seconds, row.run_id, row.created_at = (_jsonable(a.params), a.model, a.seconds,
                                                                      run_id, utcnow())
    publish.append(st)
    return "computed"


def _jsonable(params: dict) -> dict:
    return json.loads(json.dumps(params, default=str))


def _fault(point: str, call: int) -> None:
    """Crash-test hook: SIGKILL this process at ``point`` of save() call number ``ATELIER_FAULT_AFTER``."""
    if os.environ.get("ATELIER_FAULT") != point or call != int(os.environ.get("ATELIER_FAULT_AFTER", "1")):
        return
    if point == "in-commit":
        delay = float(os.environ.get("ATELIER_FAULT_DELAY_MS", "0")) / 1000
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def mark_reused(store: Store, run_id: str, keys: Sequence[str]) -> None:
    with store.sessions.begin() as s:
        for k in sorted(keys):
            _insert_new(s, RunAsset, dict(run_id=run_id, asset_key=k, status="reused", final=False))


def mark_final(store: Store, run_id: str, key: str, export_path: str) -> None:
    with store.sessions.begin() as s:
        ra = s.get(RunAsset, (run_id, key))
        ra.final = True
        ra.export_path = export_path


def record_safety(store: Store, run_id: str, deliverable: str, decisions: Sequence[dict]) -> None:
    """The safety gate's decisions (each: key, of = draft | final, nsfw score, threshold, mode, decision: pass |
    excluded for drafts, pass | flag | block for finals) in the run's ``info["safety"][deliverable][key]``: a
    blocked final is not exported, and this is where the run says why."""
    with store.sessions.begin() as s:
        run = s.get(Run, run_id, with_for_update=True, populate_existing=True)
        info = dict(run.info or {})
        mine = {**(info.get("safety") or {}).get(deliverable, {}), **{x["key"]: dict(x) for x in decisions}}
        info["safety"] = {**(info.get("safety") or {}), deliverable: mine}
        run.info = info


def safety_blocked(run: Run) -> list[dict]:
    """The finals of ``run`` the safety gate blocked (not exported), with their deliverable."""
    return [{"deliverable": name, **x} for name, xs in ((run.info or {}).get("safety") or {}).items()
            for x in xs.values() if x.get("of") == "final" and x.get("decision") == "block"]


def start_run(store: Store, run_id: str, campaign: str, brief_path: str, brief_sha256: str, profile: str,
              info: dict, resume: bool = False) -> None:
    """Record a run as "running", with the process that runs it (``atelier doctor`` finds dead ones).

    ``resume``: the run exists (it stopped at a review gate, or failed): it runs again under its id; its
    earlier info is kept and each pass is counted in ``info["passes"]``."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": process_start(os.getpid()), **info}
    with store.sessions.begin() as s:
        run = s.get(Run, run_id) if resume else None
        if run is None:
            s.add(Run(id=run_id, campaign=campaign, brief_path=brief_path, brief_sha256=brief_sha256, profile=profile,
                      status="running", started_at=utcnow(), info={**info, "passes": 1}))
            return
        run.status, run.error, run.finished_at = "running", None, None
        run.info = {**(run.info or {}), **info, "passes": (run.info or {}).get("passes", 1) + 1}


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (Linux clock ticks since boot): with the pid, names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22; the name in (...) may contain spaces


def finish_run(store: Store, run_id: str, error: str | None = None, device: str | None = None,
               info: dict | None = None, cancelled: str | None = None) -> None:
    """Record a run's end; ``info`` (e.g. the process's counters) is merged into the run's ``info``.
    ``error``: it failed; ``cancelled``: it was interrupted (why: "interrupted by SIGINT")."""
    with interrupts.deferred(), store.sessions.begin() as s:  # a second Ctrl-C waits for this row
        run = s.get(Run, run_id)
        pending = pending_gates(s, run_id)
        run.status = CANCELLED if cancelled else "failed" if error else AWAITING if pending else "completed"
        run.error = cancelled or error
        run.finished_at = utcnow()
        extra = {**(info or {}), **({"device": device} if device is not None else {})}
        if extra:
            run.info = {**(run.info or {}), **extra}


def record_fingerprint(store: Store, run_id: str, fingerprint: dict) -> None:
    """What a completed run was computed from, and what it delivered, in its ``info["fingerprint"]``
    (``atelier.fastpath``: an unchanged re-run finds it and reuses the run without Prefect)."""
    with store.sessions.begin() as s:
        run = s.get(Run, run_id, with_for_update=True, populate_existing=True)
        run.info = {**(run.info or {}), "fingerprint": fingerprint}


def record_reused_run(store: Store, run_id: str, previous: str, brief_path: str, info: dict,
                      started_at: datetime) -> None:
    """Record ``run_id`` as an unchanged re-run of the completed run ``previous`` (``atelier.fastpath``), in one
    transaction: the run, completed; every asset of ``previous`` as reused, with its finals and their export
    paths; its stage rows with nothing computed; its safety decisions and fingerprint. What a re-run through
    the flow records, without the flow: no file is written."""
    with interrupts.deferred(), store.sessions.begin() as s:
        prev = s.get(Run, previous)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": process_start(os.getpid()),
                **info, "passes": 1}
        for carried in ("versions", "gpu_tag", "safety", "fingerprint"):
            if (prev.info or {}).get(carried) is not None:
                info[carried] = prev.info[carried]
        s.add(Run(id=run_id, campaign=prev.campaign, brief_path=brief_path, brief_sha256=prev.brief_sha256,
                  profile=prev.profile, status="completed", started_at=started_at, finished_at=utcnow(), info=info))
        s.flush()
        for ra in s.scalars(select(RunAsset).where(RunAsset.run_id == previous).order_by(RunAsset.asset_key)):
            s.add(RunAsset(run_id=run_id, asset_key=ra.asset_key, status="reused", final=ra.final,
                           export_path=ra.export_path))
        for sr in s.scalars(select(StageRun).where(StageRun.run_id == previous).order_by(StageRun.id)):
            s.add(StageRun(run_id=run_id, deliverable=sr.deliverable, stage=sr.stage, seconds=0.0, computed=0,
                           reused=sr.computed + sr.reused, device="none"))  # no model touched


def cancel_run(store: Store, run_id: str, reason: str) -> bool:
    """Run ``run_id``, still "running" in this very process, was interrupted before it could say so itself
    (the signal came while the flow started or ended): cancelled. False if it is not such a run."""
    with interrupts.deferred(), store.sessions.begin() as s:
        run = s.get(Run, run_id)
        info = (run.info or {}) if run is not None else {}
        if run is None or run.status != "running" or info.get("pid") != os.getpid() or (
                info.get("host") != socket.gethostname()):
            return False
        run.status, run.finished_at, run.error = CANCELLED, utcnow(), reason
        return True


def record_stage(store: Store, run_id: str, deliverable: str | None, stage: str, seconds: float,
                 computed: int, reused: int, device: str) -> None:
    with store.sessions.begin() as s:
        s.add(StageRun(run_id=run_id, deliverable=deliverable, stage=stage, seconds=seconds, computed=computed,
                       reused=reused, device=device))


def scores_for(session: Session, decision: str) -> list[Score]:
    return list(session.scalars(select(Score).where(Score.decision == decision)))


# ----------------------------------------------------------------------------- review gates and ratings
AWAITING = "awaiting review"  # a run's status when it stopped at a gate no person has decided yet
CANCELLED = "cancelled"  # stopped by Ctrl-C or SIGTERM: what it stored is kept; `atelier resume` continues it


def record_gate(store: Store, run_id: str, decision: str, deliverable: str, round_no: int,
                candidates: Sequence[str]) -> None:
    """Run ``run_id`` reached the selection ``decision``, where a person decides over ``candidates``."""
    with store.sessions.begin() as s:
        _insert_new(s, Gate, dict(run_id=run_id, decision=decision, deliverable=deliverable, round=round_no,
                                  candidates=list(candidates), created_at=utcnow()))


def latest_review(s: Session, decision: str) -> Review | None:
    return s.scalars(select(Review).where(Review.decision == decision).order_by(Review.id.desc()).limit(1)).first()


def pending_gates(s: Session, run_id: str) -> list[Gate]:
    """The gates of a run no person has decided yet, by deliverable and round."""
    gates = s.scalars(select(Gate).where(Gate.run_id == run_id).order_by(Gate.deliverable, Gate.round))
    return [g for g in gates if latest_review(s, g.decision) is None]


def record_review(store: Store, decision: str, deliverable: str, round_no: int, kept: Sequence[str],
                  rejected: Sequence[str] = (), stars: dict[str, int] | None = None, note: str = "",
                  by: str = "", run_id: str | None = None) -> int:
    """A person's decision at a gate (keys of the candidates kept, in order); its stars and rejects are
    ratings of those assets too. Returns the review's id."""
    stars = dict(stars or {})
    with store.sessions.begin() as s:
        review = Review(decision=decision, deliverable=deliverable, round=round_no, kept=list(kept),
                        rejected=list(rejected), stars=stars, note=note, by=by, run_id=run_id, created_at=utcnow())
        s.add(review)
        for key in sorted(set(rejected) | set(stars)):
            s.add(Rating(asset_key=key, stars=stars.get(key), rejected=key in rejected, note="", by=by,
                         created_at=utcnow()))
        s.flush()
        return review.id


def rate(store: Store, keys: Sequence[str], stars: int | None, rejected: bool, by: str, note: str = "") -> None:
    """Stars (1-5) and / or a reject on assets; the latest rating of an asset is the one that counts."""
    with store.sessions.begin() as s:
        for key in keys:
            s.add(Rating(asset_key=key, stars=stars, rejected=rejected, note=note, by=by, created_at=utcnow()))


# ------------------------------------------------------------------------------------- repairs (doctor)
def mark_dead_run(s: Session, run_id: str, reason: str) -> bool:
    """A "running" run whose process is gone: failed, with ``reason``. False if it is not running."""
    run = s.get(Run, run_id)
    if run is None or run.status != "running":
        return False
    run.status, run.finished_at, run.error = "failed", utcnow(), reason
    return True


def delete_rows(s: Session, edges: Sequence[tuple[str, str, str]] = (), run_assets: Sequence[tuple[str, str]] = (),
                stage_runs: Sequence[int] = ()) -> None:
    """Delete single rows: edges (child, parent, role), run memberships (run, key) and stage rows (id)."""
    for child, parent, role in edges:
        s.execute(delete(Edge).where(Edge.child == child, Edge.parent == parent, Edge.role == role))
    for run_id, key in run_assets:
        s.execute(delete(RunAsset).where(RunAsset.run_id == run_id, RunAsset.asset_key == key))
    for row_id in stage_runs:
        s.execute(delete(StageRun).where(StageRun.id == row_id))


def delete_assets(s: Session, keys: set[str], decisions: set[str]) -> tuple[set[str], set[str]]:
    """Delete ``keys``, everything computed from them, and the selection ``decisions`` (with what they
    selected), with their edges, run memberships and scores; returns the deleted keys and their files."""
    doomed: set[str] = set()
    decisions = set(decisions)
    todo = set(keys) | _selected_by(s, decisions)
    while todo:
        doomed |= todo
        children = set(s.scalars(select(Edge.child).where(Edge.parent.in_(todo))))
        # A selection is one decision over all its drafts: when one draft goes, the decision goes whole.
        new_decisions = set(s.scalars(select(Score.decision).where(Score.draft_key.in_(todo)))) - decisions
        decisions |= new_decisions
        todo = (children | _selected_by(s, new_decisions)) - doomed
    paths = set(s.scalars(select(Asset.path).where(Asset.key.in_(doomed))))
    s.execute(delete(Score).where(Score.decision.in_(decisions) | Score.draft_key.in_(doomed)))
    s.execute(delete(Edge).where(Edge.child.in_(doomed) | Edge.parent.in_(doomed)))
    s.execute(delete(RunAsset).where(RunAsset.asset_key.in_(doomed)))
    s.execute(delete(Rating).where(Rating.asset_key.in_(doomed)))
    s.execute(delete(Asset).where(Asset.key.in_(doomed)))
    return doomed, paths


def _selected_by(s: Session, decisions: set[str]) -> set[str]:
    if not decisions:
        return set()
    return {a.key for a in s.scalars(select(Asset).where(Asset.stage == "select"))
            if (a.params or {}).get("decision") in decisions}
