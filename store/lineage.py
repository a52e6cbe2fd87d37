"""The one place lineage is written.

``save()`` follows the crash-safe order: write every file to a temp path, insert the rows and commit
in one short transaction, then move the files into place. A crash before the commit leaves only temp
files (never referenced); a crash after it leaves rows whose files are still in ``assets/.tmp`` —
``store.queries.existing`` treats such assets as missing, so the next run recomputes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import Store
from store.schema import Asset, Edge, Run, RunAsset, Score, StageRun


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class NewAsset:
    key: str
    stage: str
    kind: str  # image | mask | embedding
    campaign: str
    deliverable: str | None
    data: bytes  # the encoded file (PNG, .npy)
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


def save(store: Store, run_id: str, assets: Sequence[NewAsset], scores: Sequence[NewScore] = ()) -> list[str]:
    """Persist new assets (files + rows + edges + run membership) and selection scores. Idempotent.

    If another process stored the same key meanwhile, its row wins and ours is counted as reused.
    """
    staged = [store.files.stage(a.data, a.suffix) for a in assets]
    try:
        with store.sessions.begin() as s:
            for a, st in zip(assets, staged):
                if s.get(Asset, a.key) is None:
                    s.add(Asset(key=a.key, stage=a.stage, kind=a.kind, campaign=a.campaign, deliverable=a.deliverable,
                                path=st.rel_path, sha256=st.sha256, width=a.width, height=a.height,
                                params=json.loads(json.dumps(a.params, default=str)), model=a.model,
                                seconds=a.seconds, run_id=run_id, created_at=utcnow()))
                    s.flush()
                    for pos, (parent, role) in enumerate(a.parents):
                        s.merge(Edge(child=a.key, parent=parent, role=role, position=pos))
                    status = "computed"
                else:
                    status = "reused"
                if s.get(RunAsset, (run_id, a.key)) is None:
                    s.add(RunAsset(run_id=run_id, asset_key=a.key, status=status))
            for sc in scores:
                s.merge(Score(**sc.__dict__))
    except BaseException:
        for st in staged:
            store.files.discard(st)
        raise
    for st in staged:
        store.files.publish(st)
    return [a.key for a in assets]


def mark_reused(store: Store, run_id: str, keys: Sequence[str]) -> None:
    with store.sessions.begin() as s:
        for k in keys:
            if s.get(RunAsset, (run_id, k)) is None:
                s.add(RunAsset(run_id=run_id, asset_key=k, status="reused"))


def mark_final(store: Store, run_id: str, key: str, export_path: str) -> None:
    with store.sessions.begin() as s:
        ra = s.get(RunAsset, (run_id, key))
        ra.final = True
        ra.export_path = export_path


def start_run(store: Store, run_id: str, campaign: str, brief_path: str, brief_sha256: str, profile: str,
              info: dict) -> None:
    with store.sessions.begin() as s:
        s.add(Run(id=run_id, campaign=campaign, brief_path=brief_path, brief_sha256=brief_sha256, profile=profile,
                  status="running", started_at=utcnow(), info=info))


def finish_run(store: Store, run_id: str, error: str | None = None) -> None:
    with store.sessions.begin() as s:
        run = s.get(Run, run_id)
        run.status = "failed" if error else "completed"
        run.error = error
        run.finished_at = utcnow()


def record_stage(store: Store, run_id: str, deliverable: str | None, stage: str, seconds: float,
                 computed: int, reused: int, device: str) -> None:
    with store.sessions.begin() as s:
        s.add(StageRun(run_id=run_id, deliverable=deliverable, stage=stage, seconds=seconds, computed=computed,
                       reused=reused, device=device))


def scores_for(session: Session, decision: str) -> list[Score]:
    return list(session.scalars(select(Score).where(Score.decision == decision)))
